"""A performance (atelier/music/score.py) → a MIDI file, or audio from our own synthesiser.

No soundfonts and nothing downloaded: the audio is additive synthesis in numpy, a voice per
instrument in `INSTRUMENTS`, each also named by its General MIDI program for `to_midi`.

How a note sounds (`note_wave`), vectorised over its samples:
1. A spectrum: harmonic h of f0 at h^-tilt, even harmonics scaled, a low-pass at `cutoff`,
   body resonances (a fiddle's bridge hill, a piano's hammer position); harmonics above 0.45 of
   the sample rate left out, so nothing aliases. It becomes one cycle of a wavetable (irfft).
2. A phase: f0 with vibrato fading in after the attack (bowed and blown voices), read through
   the table; plucked and struck voices crossfade from a bright table to a mellow one as they
   ring, and a second, detuned reading gives accordion reeds and piano strings their beating.
3. An envelope: raised-cosine attack and release (no clicks), a decay to the sustain level, or
   an exponential ring for plucked voices, longer for low notes; breath noise at the attack.
Notes are cached by (instrument, pitch, length) — a tune repeats itself — and mixed at their
velocity; then a short room reverb (FFT convolution with a fixed-seed noise tail), fades,
and normalisation to −1 dBFS. Same performance, same bytes.
"""

from __future__ import annotations

import io
import math
import zlib
from dataclasses import dataclass

import numpy as np

from atelier.music.score import Performance

TICKS_PER_QUARTER = 480
MELODY_CHANNEL, ACCOMPANIMENT_CHANNEL = 0, 1
DEFAULT_MAX_SECONDS = 300.0
MAX_NOTES = 20_000  # melody and accompaniment together
TAIL_SECONDS = 1.0  # after the last beat: the last note's release and the room's echo
TABLE_SIZE = 2048
MAX_HARMONICS = 40
PEAK = 10 ** (-1 / 20)  # normalise to −1 dBFS
ACCOMPANIMENT_LEVEL = 0.45  # the band sits under the tune
REVERB_WET, REVERB_DECAY, REVERB_SECONDS = 0.16, 0.16, 0.9  # decay: seconds to fall by 1/e


class RenderTooLong(ValueError):
    """The rendering would exceed the length or note limit; nothing was synthesised."""


@dataclass(frozen=True)
class Instrument:
    program: int  # General MIDI program, 0-based
    tilt: float  # harmonic h at h^-tilt: 1 a sawtooth (bowed, reeds), 2–3 a flute
    even: float = 1.0  # even harmonics scaled by this (0: odd harmonics only, a clarinet-like hollow)
    cutoff: float = 6000.0  # Hz: harmonics above fall off at 24 dB an octave
    formants: tuple[tuple[float, float], ...] = ()  # (Hz, dB) resonances about an octave wide
    strike: float = 0.0  # pluck or hammer position along the string (0: none): notches harmonics 1/strike
    plucked: bool = False  # rings down instead of sustaining
    attack: float = 0.03  # seconds
    decay: float = 0.2  # sustained: seconds to settle to `sustain`; plucked: 1/e ring time at 220 Hz
    sustain: float = 0.85
    release: float = 0.08  # seconds after the note ends
    vibrato: float = 0.0  # depth, a fraction of f0 (0.004 ≈ 7 cents)
    vibrato_rate: float = 5.5  # Hz
    detune: float = 0.0  # cents: a second voice beating against the first
    breath: float = 0.0  # noise at the attack: a flute's chiff, a bow's scratch, a hammer's thump
    mellow: float = 0.0  # seconds over which a plucked voice's bright attack mellows
    gain: float = 1.0


INSTRUMENTS = {
    # Bowed: a sawtooth through the body's resonances and the bridge hill near 2.5 kHz.
    "fiddle": Instrument(40, tilt=1.0, cutoff=5000, formants=((290, 4), (480, 3), (2500, 7)),
                         attack=0.05, decay=0.25, sustain=0.8, release=0.09, vibrato=0.004,
                         vibrato_rate=5.6, breath=0.02, gain=0.9),
    # Blown: mostly the fundamental, a breathy attack.
    "flute": Instrument(73, tilt=2.6, even=1.6, cutoff=4000, attack=0.06, decay=0.3, sustain=0.85,
                        release=0.1, vibrato=0.003, vibrato_rate=5.0, breath=0.07, gain=1.0),
    "whistle": Instrument(74, tilt=2.2, even=0.7, cutoff=5000, formants=((3000, 3),), attack=0.025,
                          decay=0.15, sustain=0.9, release=0.06, vibrato=0.002, vibrato_rate=6.0,
                          breath=0.05, gain=0.9),
    # Free reeds: bright, no vibrato, two reeds a few cents apart (the musette's shimmer).
    "accordion": Instrument(21, tilt=0.9, even=0.7, cutoff=3000, formants=((1200, 3),), attack=0.03,
                            decay=0.1, sustain=0.95, release=0.06, detune=7.0, gain=0.7),
    # Struck and plucked strings: ring down, brightness first.
    "piano": Instrument(0, tilt=1.3, cutoff=4000, strike=1 / 7, plucked=True, attack=0.004, decay=1.2,
                        release=0.12, detune=1.2, breath=0.02, mellow=0.25, gain=1.0),
    "guitar": Instrument(25, tilt=1.0, cutoff=4500, strike=1 / 5, plucked=True, attack=0.003, decay=0.8,
                         release=0.08, mellow=0.12, gain=1.0),
    "harp": Instrument(46, tilt=1.7, cutoff=3000, strike=1 / 2.3, plucked=True, attack=0.004, decay=1.6,
                       release=0.3, mellow=0.3, gain=1.1),
}


def instrument(name: str) -> Instrument:
    if name not in INSTRUMENTS:
        raise ValueError(f"unknown instrument {name!r}; known: {', '.join(sorted(INSTRUMENTS))}")
    return INSTRUMENTS[name]


def check_size(perf: Performance, max_seconds: float | None, chords: bool) -> None:
    """RenderTooLong before any work: the length against `max_seconds`, the notes against MAX_NOTES."""
    notes = len(perf.notes) + (len(perf.accompaniment) if chords else 0)
    if notes > MAX_NOTES:
        raise RenderTooLong(f"this tune plays {notes:,} notes; a rendering is limited to {MAX_NOTES:,}")
    if max_seconds is not None and perf.seconds > max_seconds:
        raise RenderTooLong(f"this tune plays for {perf.seconds:.1f} s at {perf.tempo_qpm:g} quarter notes a "
                            f"minute; a rendering is limited to {max_seconds:g} s (max_seconds)")


# -- MIDI ---------------------------------------------------------------------------------

def to_midi(perf: Performance, *, melody: str = "fiddle", accompaniment: str = "piano",
            chords: bool = True) -> bytes:
    """A Standard MIDI File, type 1: a conductor track (tempo, meters), the melody on channel 0
    and the accompaniment on channel 1 (MIDI's 1 and 2), each with its instrument's General MIDI
    program.

    >>> from atelier.music.abc import parse
    >>> from atelier.music.score import performance
    >>> to_midi(performance(parse("X:1\\nK:G\\nGABc"))).startswith(b"MThd")
    True
    """
    import mido

    lead, band = instrument(melody), instrument(accompaniment)
    check_size(perf, None, chords)
    midi = mido.MidiFile(type=1, ticks_per_beat=TICKS_PER_QUARTER)

    def ticks(quarters: float) -> int:
        return round(quarters * TICKS_PER_QUARTER)

    def track(name: str, events: list[tuple[int, int, mido.Message]]) -> None:
        # Events are (tick, order, message); at one tick a note ends before the next begins.
        out = mido.MidiTrack([mido.MetaMessage("track_name", name=name)])
        now = 0
        for tick, _, message in sorted(events, key=lambda e: (e[0], e[1])):
            out.append(message.copy(time=tick - now))
            now = tick
        out.append(mido.MetaMessage("end_of_track", time=0))
        midi.tracks.append(out)

    conductor = [(0, 0, mido.MetaMessage("set_tempo", tempo=round(60_000_000 / perf.tempo_qpm)))]
    for at, meter in perf.meters or [(0.0, perf.meter)]:
        if meter is not None:
            num, den = meter
            beat_clocks = 36 if den >= 8 and num % 3 == 0 and num > 3 else 24  # a click per dotted quarter in 6/8
            conductor.append((ticks(at), 1, mido.MetaMessage("time_signature", numerator=num, denominator=den,
                                                             clocks_per_click=beat_clocks,
                                                             notated_32nd_notes_per_beat=8)))
    track(perf.title.encode("latin-1", "replace").decode("latin-1") or "tune", conductor)

    def voice(notes, channel: int, program: int) -> list:
        events = [(0, 0, mido.Message("program_change", channel=channel, program=program))]
        for n in notes:
            events.append((ticks(n.start), 2, mido.Message("note_on", channel=channel, note=n.pitch,
                                                           velocity=n.velocity)))
            events.append((max(ticks(n.start + n.duration), ticks(n.start) + 1), 1,
                           mido.Message("note_off", channel=channel, note=n.pitch, velocity=64)))
        return events

    track(f"melody ({melody})", voice(perf.notes, MELODY_CHANNEL, lead.program))
    if chords and perf.accompaniment:
        track(f"accompaniment ({accompaniment})", voice(perf.accompaniment, ACCOMPANIMENT_CHANNEL, band.program))
    buffer = io.BytesIO()
    midi.save(file=buffer)
    return buffer.getvalue()


# -- the synthesiser ----------------------------------------------------------------------

def frequency(pitch: int) -> float:
    return 440.0 * 2 ** ((pitch - 69) / 12)


def wavetable(voice: Instrument, f0: float, sample_rate: int, mellow: bool) -> np.ndarray:
    """One cycle of the voice's steady tone at f0 (step 1), TABLE_SIZE + 1 samples (the last
    repeats the first, for interpolation), RMS 1/√2 like a sine."""
    h = np.arange(1, MAX_HARMONICS + 1, dtype=np.float64)
    f = h * f0
    amp = h ** -voice.tilt
    amp[1::2] *= voice.even
    amp /= 1 + (f / voice.cutoff) ** 4
    for centre, db in voice.formants:
        amp *= 10 ** (db / 20 * np.exp(-0.5 * (np.log2(f / centre) / 0.6) ** 2))
    if voice.strike:
        amp *= np.abs(np.sin(np.pi * h * voice.strike)) + 0.05
    if mellow:
        amp *= np.exp(-(h - 1) * 0.7)
    amp[f >= 0.45 * sample_rate] = 0
    spectrum = np.zeros(TABLE_SIZE // 2 + 1, dtype=np.complex128)
    spectrum[1:MAX_HARMONICS + 1] = -1j * amp * TABLE_SIZE / 2  # sines
    table = np.fft.irfft(spectrum, TABLE_SIZE)
    table *= (1 / math.sqrt(2)) / max(float(np.sqrt(np.mean(table ** 2))), 1e-12)
    return np.append(table, table[0])


def read_table(table: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """The table read at `phase` (in cycles), linearly interpolated."""
    position = (phase % 1.0) * TABLE_SIZE
    index = position.astype(np.int64)
    frac = position - index
    return table[index] + frac * (table[index + 1] - table[index])


def raised_cosine(x: np.ndarray) -> np.ndarray:
    """0 → 1 smoothly over x in [0, 1]: attacks and releases without clicks."""
    return 0.5 - 0.5 * np.cos(np.pi * np.clip(x, 0.0, 1.0))


def note_wave(voice: Instrument, pitch: int, held: float, sample_rate: int, noise: np.ndarray) -> np.ndarray:
    """One note held for `held` seconds, then released: float64 samples, peak about 1."""
    f0 = frequency(pitch)
    n_on = max(1, round(held * sample_rate))
    n = n_on + max(1, round(voice.release * sample_rate))
    t = np.arange(n) / sample_rate

    # 2. Phase in cycles; vibrato fades in over 0.3 s once the attack is over.
    if voice.vibrato:
        depth = voice.vibrato * raised_cosine((t - voice.attack - 0.1) / 0.3)
        phase = np.cumsum(f0 / sample_rate * (1 + depth * np.sin(2 * np.pi * voice.vibrato_rate * t)))
    else:
        phase = f0 / sample_rate * np.arange(n)
    bright = wavetable(voice, f0, sample_rate, mellow=False)
    wave = read_table(bright, phase)
    if voice.detune:
        wave = 0.5 * (wave + read_table(bright, phase * 2 ** (voice.detune / 1200) + 0.25))
    if voice.mellow:  # the bright attack fades into the mellow tone
        mellow_wave = read_table(wavetable(voice, f0, sample_rate, mellow=True), phase)
        brightness = np.exp(-t / voice.mellow)
        wave = brightness * wave + (1 - brightness) * mellow_wave

    # 3. Envelope: attack, then a ring-down (plucked, faster for high notes) or a decay to the
    # sustain level (bowed, blown); a raised-cosine release after the note ends.
    envelope = raised_cosine(t / voice.attack)
    if voice.plucked:
        envelope *= np.exp(-t / (voice.decay * math.sqrt(220.0 / f0)))
    else:
        envelope *= voice.sustain + (1 - voice.sustain) * np.exp(-np.maximum(t - voice.attack, 0) / voice.decay)
    envelope *= 1 - raised_cosine((t - held) / voice.release)
    if voice.breath:  # a puff at the attack; bowed and blown notes keep a little of it while they sound
        puff = noise[np.arange(n) % len(noise)] * (np.exp(-t / 0.04) + (0.0 if voice.plucked else 0.12))
        wave = wave + voice.breath * puff
    return wave * envelope


def synthesize(perf: Performance, *, melody: str = "fiddle", accompaniment: str = "piano", chords: bool = True,
               sample_rate: int = 22050, max_seconds: float | None = DEFAULT_MAX_SECONDS) -> np.ndarray:
    """The performance as mono float32 samples in [−1, 1], `TAIL_SECONDS` longer than the music."""
    lead, band = instrument(melody), instrument(accompaniment)
    if not 8000 <= sample_rate <= 48000:
        raise ValueError(f"sample_rate {sample_rate} is out of range: 8000 to 48000")
    check_size(perf, max_seconds, chords)
    total = math.ceil((perf.seconds + TAIL_SECONDS) * sample_rate)
    out = np.zeros(total, dtype=np.float64)
    # Breath noise, one fixed buffer: white noise from a fixed seed, kept to 300 Hz – 4 kHz where
    # breath and bow noise live (full-band noise is hiss).
    spectrum = np.fft.rfft(np.random.default_rng(0).standard_normal(sample_rate))
    hz = np.fft.rfftfreq(sample_rate, 1 / sample_rate)
    noise = np.fft.irfft(spectrum / (1 + (300 / np.maximum(hz, 1)) ** 2) / (1 + (hz / 4000) ** 4), sample_rate)
    noise /= np.sqrt(np.mean(noise ** 2))
    cache: dict[tuple[str, int, int], np.ndarray] = {}

    def play(notes, voice: Instrument, name: str, level: float) -> None:
        for note in notes:
            start = round(perf.seconds_at(note.start) * sample_rate)
            seconds = perf.seconds_at(note.duration)
            # Bowed and blown notes leave a breath before the next (repeated notes stay apart);
            # plucked ones ring for their whole length.
            held = seconds if voice.plucked else seconds - min(0.04, 0.15 * seconds)
            key = (name, note.pitch, round(held * sample_rate))
            if key not in cache:
                cache[key] = note_wave(voice, note.pitch, held, sample_rate, noise)
            wave = cache[key][: total - start]
            out[start:start + len(wave)] += wave * (level * voice.gain * (note.velocity / 127) ** 1.6)

    play(perf.notes, lead, melody, 1.0)
    if chords:
        play(perf.accompaniment, band, accompaniment, ACCOMPANIMENT_LEVEL)

    # A small room: the dry mix convolved (by FFT) with an exponentially decaying noise tail.
    n_ir = round(REVERB_SECONDS * sample_rate)
    t = np.arange(n_ir) / sample_rate
    ir = np.random.default_rng(1).standard_normal(n_ir) * np.exp(-t / REVERB_DECAY)
    ir[: round(0.012 * sample_rate)] = 0  # pre-delay: the first reflection arrives after 12 ms
    ir /= np.sqrt(np.sum(ir ** 2))
    size = 1 << (total + n_ir - 1).bit_length()
    spectrum = np.fft.rfft(out, size) * np.fft.rfft(ir, size)
    frequencies = np.fft.rfftfreq(size, 1 / sample_rate)
    spectrum /= 1 + (frequencies / 3500) ** 2  # walls absorb the highs
    out += REVERB_WET * np.fft.irfft(spectrum, size)[:total]

    fade_in, fade_out = round(0.005 * sample_rate), round(0.3 * sample_rate)
    out[:fade_in] *= raised_cosine(np.arange(fade_in) / fade_in)
    out[-fade_out:] *= 1 - raised_cosine(np.arange(fade_out) / fade_out)
    peak = float(np.max(np.abs(out)))
    if peak > 0:  # a tune with no notes stays silent
        out *= PEAK / peak
    return out.astype(np.float32)


# -- files --------------------------------------------------------------------------------

def to_wav(perf: Performance, *, melody: str = "fiddle", accompaniment: str = "piano", chords: bool = True,
           sample_rate: int = 22050, max_seconds: float | None = DEFAULT_MAX_SECONDS) -> bytes:
    """WAV, 16-bit PCM, mono. RenderTooLong past `max_seconds` (checked before synthesising)."""
    import soundfile

    samples = synthesize(perf, melody=melody, accompaniment=accompaniment, chords=chords,
                         sample_rate=sample_rate, max_seconds=max_seconds)
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def to_ogg(perf: Performance, *, melody: str = "fiddle", accompaniment: str = "piano", chords: bool = True,
           sample_rate: int = 22050, max_seconds: float | None = DEFAULT_MAX_SECONDS) -> bytes:
    """Ogg Vorbis, mono. libsndfile gives each stream a random serial number; we set it to a
    constant so the same performance gives the same bytes."""
    import soundfile

    samples = synthesize(perf, melody=melody, accompaniment=accompaniment, chords=chords,
                         sample_rate=sample_rate, max_seconds=max_seconds)
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, sample_rate, format="OGG", subtype="VORBIS")
    return fixed_ogg_serial(buffer.getvalue())


OGG_SERIAL = 0x41544C52  # "ATLR"
BIT_REVERSED = bytes(int(f"{b:08b}"[::-1], 2) for b in range(256))


def ogg_crc(page: bytes) -> int:
    """Ogg's CRC-32 (polynomial 0x04C11DB7, not reflected, initial 0, no final xor), computed
    with zlib's reflected CRC-32 over bit-reversed bytes: fast, no Python loop over bytes."""
    register = zlib.crc32(page.translate(BIT_REVERSED), 0xFFFFFFFF) ^ 0xFFFFFFFF
    return int(f"{register:032b}"[::-1], 2)


def fixed_ogg_serial(data: bytes) -> bytes:
    """Every page's stream serial number (bytes 14–17) set to OGG_SERIAL, its CRC (22–25) redone."""
    out = bytearray(data)
    at = 0
    while at + 27 <= len(out) and out[at:at + 4] == b"OggS":
        segments = out[at + 26]
        size = 27 + segments + sum(out[at + 27:at + 27 + segments])
        out[at + 14:at + 18] = OGG_SERIAL.to_bytes(4, "little")
        out[at + 22:at + 26] = bytes(4)
        out[at + 22:at + 26] = ogg_crc(bytes(out[at:at + size])).to_bytes(4, "little")
        at += size
    if at != len(out):
        raise RuntimeError(f"libsndfile wrote an Ogg stream we could not walk (stopped at byte {at} of {len(out)})")
    return bytes(out)
