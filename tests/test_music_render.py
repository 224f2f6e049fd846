"""A tune → performance → MIDI, WAV and Ogg: pitches, repeats, ties, accompaniment, limits, determinism."""

from __future__ import annotations

import io

import mido
import numpy as np
import pytest
import soundfile

from atelier.music.abc import parse
from atelier.music.render import INSTRUMENTS, TAIL_SECONDS, RenderTooLong, to_midi, to_ogg, to_wav
from atelier.music.score import chord_tones, performance

# G major (F is F#). Bar 2: ^c carries to the next c of that octave, =f to the next f, and C (an
# octave lower) keeps its natural; bar 3 starts afresh. Endings: [1 the first time, [2 the second.
# The B part has no |:, so its :| repeats from the || before it.
TUNE = """X:1
T:Render Test
M:4/4
L:1/8
Q:1/4=120
K:G
|:"G"GABc dBGF|"D"^cdc=f fdAC|[1"G"cf G4- G2:|[2"C"c4- c4||
"Am"A2 _B2 B4|"D7"d8:|
"""
BAR_1 = [67, 69, 71, 72, 74, 71, 67, 66]
BAR_2 = [73, 74, 73, 77, 77, 74, 69, 60]
ENDING_1 = [72, 78, 67]  # c natural again, f sharp again, G4-G2 one note
ENDING_2 = [72]  # c4-c4 tied across the bar line
PART_B = [69, 70, 70, 74]
EXPECTED = BAR_1 + BAR_2 + ENDING_1 + BAR_1 + BAR_2 + ENDING_2 + PART_B + PART_B
SECONDS = 20.0  # 10 bars of 4/4 at 120 quarter notes a minute


def read_midi(data: bytes) -> tuple[mido.MidiFile, dict[int, list[tuple[int, int, int]]]]:
    """MIDI bytes → the file and, per channel, (start tick, length in ticks, pitch) in order of start."""
    midi = mido.MidiFile(file=io.BytesIO(data))
    notes: dict[int, list[tuple[int, int, int]]] = {}
    for track in midi.tracks:
        now, sounding = 0, {}
        for message in track:
            now += message.time
            if message.type == "note_on" and message.velocity > 0:
                sounding[(message.channel, message.note)] = now
            elif message.type in ("note_off", "note_on"):
                start = sounding.pop((message.channel, message.note))
                notes.setdefault(message.channel, []).append((start, now - start, message.note))
    return midi, {channel: sorted(found) for channel, found in notes.items()}


@pytest.fixture(scope="module")
def perf():
    return performance(parse(TUNE))


def melody(abc: str) -> list[int]:
    return [n.pitch for n in performance(parse(abc)).notes]


def test_midi_melody_pitches_repeats_and_ties(perf):
    midi, channels = read_midi(to_midi(perf))
    assert midi.type == 1 and midi.ticks_per_beat == 480
    lead = channels[0]
    assert [p for _, _, p in lead] == EXPECTED
    assert len(lead) == 44
    # The tied G4-G2 of ending 1: one note of 3 quarters, on beat 2 of the third bar.
    assert lead[18] == (9 * 480, 3 * 480, 67)
    # Ending 2's c4-|c4: one note of a whole bar, at bar 6 (after bars 1, 2, ending 1, bars 1, 2).
    assert lead[35] == (20 * 480, 4 * 480, 72)


def test_midi_meta_and_programs(perf):
    midi, _ = read_midi(to_midi(perf, melody="flute", accompaniment="guitar"))
    meta = {m.type: m for track in midi.tracks for m in track if m.is_meta}
    assert meta["set_tempo"].tempo == 500_000  # Q:1/4=120
    assert (meta["time_signature"].numerator, meta["time_signature"].denominator) == (4, 4)
    programs = {m.channel: m.program for track in midi.tracks for m in track if m.type == "program_change"}
    assert programs == {0: INSTRUMENTS["flute"].program, 1: INSTRUMENTS["guitar"].program}


def test_accompaniment_on_its_own_channel(perf):
    _, channels = read_midi(to_midi(perf))
    band = channels[1]
    # The first bar (G): bass G2 on beat 1, the G chord (G B D) on beat 2, the fifth (D3) on beat 3.
    assert (0, 480, 43) in band
    assert {p for start, _, p in band if start == 480} == {55, 59, 62}
    assert (2 * 480, 480, 50) in band
    # D7 in the B part sounds its seventh (C).
    assert any(p % 12 == 0 for start, _, p in band if 28 * 480 < start < 32 * 480)
    # Without chords, one track of notes only.
    _, only = read_midi(to_midi(perf, chords=False))
    assert list(only) == [0]


def test_repeat_signs():
    assert melody("X:1\nL:1/4\nK:C\nC D:|E") == [60, 62, 60, 62, 64]  # :| with no |: goes back to the start
    assert melody("X:1\nL:1/4\nK:C\nC|:D::E:|F") == [60, 62, 62, 64, 64, 65]  # :: ends one repeat, starts the next
    assert melody("X:1\nL:1/4\nK:C\n|:C|1D:|2E|F|]") == [60, 62, 60, 64, 65]  # |1 and :|2 endings


def test_key_change_and_accidentals():
    # K:D mid-tune brings F# and C#; _B carries through the bar, not past it; = cancels the key.
    assert melody("X:1\nL:1/4\nK:C\nFc|\nK:D\nFc|_BB|B=FF|") == [65, 72, 66, 73, 70, 70, 71, 65, 65]


def test_jig_tempo_and_dotted_quarter_beats():
    perf = performance(parse('X:1\nM:6/8\nL:1/8\nK:D\n"D"dcd "A7"e2c|"D"d3 d3|'))
    assert perf.tempo_qpm == 165 and perf.meter == (6, 8)
    # A one-beat chord: bass and chord together; a full bar: bass, then the chord on beat 2.
    starts = sorted({n.start for n in perf.accompaniment})
    assert starts == [0.0, 1.5, 3.0, 4.5]
    assert [c.symbol for c in perf.chords] == ["D", "A7", "D"]


@pytest.mark.parametrize("symbol, expected", [
    ("G", (7, [7, 11, 2], 7)), ("Em", (4, [4, 7, 11], 4)), ("D7", (2, [2, 6, 9, 0], 2)),
    ("F#m", (6, [6, 9, 1], 6)), ("Bb", (10, [10, 2, 5], 10)), ("G/B", (7, [7, 11, 2], 11)),
    ("Bm7b5", (11, [11, 2, 5, 9], 11)), ("A7sus4", (9, [9, 2, 4, 7], 9)), ("D/f+", (2, [2, 6, 9], 6)),
    ("(E7)", (4, [4, 8, 11, 2], 4)), ("H7", None), ("Gzz", None), ("", None),
])
def test_chord_symbols(symbol, expected):
    assert chord_tones(symbol) == expected


def test_unknown_chord_symbol_is_skipped():
    perf = performance(parse('X:1\nL:1/4\nK:C\n"C"CDEF|"Q9"GABc|'))
    assert [c.symbol for c in perf.chords] == ["C"] and perf.chords[0].duration == 8.0


def test_transpose_moves_every_pitch(perf):
    up = performance(parse(TUNE), transpose=2)
    assert [n.pitch for n in up.notes] == [p + 2 for p in EXPECTED]
    assert [n.pitch for n in up.accompaniment] == [n.pitch + 2 for n in perf.accompaniment]
    _, channels = read_midi(to_midi(up))
    assert [p for _, _, p in channels[0]] == [p + 2 for p in EXPECTED]


def test_tempo_override():
    fast = performance(parse(TUNE), tempo=240)
    assert fast.seconds == pytest.approx(SECONDS / 2)


def test_wav_length_and_sound(perf):
    data = to_wav(perf, sample_rate=16000)
    samples, rate = soundfile.read(io.BytesIO(data))
    assert rate == 16000 and soundfile.info(io.BytesIO(data)).subtype == "PCM_16"
    assert len(samples) / rate == pytest.approx(SECONDS + TAIL_SECONDS, abs=0.01)
    assert 0.5 < np.max(np.abs(samples)) < 0.95  # normalised, not clipped
    # Sound all through the music, not just somewhere: every second has some.
    seconds = samples[: int(SECONDS) * rate].reshape(-1, rate)
    assert np.sqrt(np.mean(seconds ** 2, axis=1)).min() > 0.02


def test_ogg_decodes(perf):
    data = to_ogg(perf, melody="whistle", accompaniment="harp", sample_rate=16000)
    samples, rate = soundfile.read(io.BytesIO(data))
    assert data[:4] == b"OggS" and rate == 16000
    assert len(samples) / rate == pytest.approx(SECONDS + TAIL_SECONDS, abs=0.05)
    assert np.sqrt(np.mean(samples ** 2)) > 0.02


def test_same_performance_same_bytes(perf):
    assert to_midi(perf) == to_midi(perf)
    assert to_wav(perf, sample_rate=8000) == to_wav(perf, sample_rate=8000)
    assert to_ogg(perf, sample_rate=8000) == to_ogg(perf, sample_rate=8000)


def test_unknown_instrument(perf):
    with pytest.raises(ValueError, match="unknown instrument 'bagpipes'.*accordion, fiddle, flute"):
        to_wav(perf, melody="bagpipes")
    with pytest.raises(ValueError, match="unknown instrument 'kazoo'"):
        to_midi(perf, accompaniment="kazoo")


def test_too_long(perf):
    with pytest.raises(RenderTooLong, match="20.0 s.*limited to 5 s"):
        to_wav(perf, max_seconds=5)
    with pytest.raises(RenderTooLong):
        to_ogg(perf, max_seconds=19.5)
