"""abc-gpt: chargpt's decoder over ABC tokens — folk tunes that always parse and scan.

Served by the "call" engine: `POST /api/music` calls `TuneModel.compose` in a worker
thread, one tune at a time per model (the bar-keeping mask is per tune, and sampling alone
keeps a seed's tune byte-identical whatever else is asked). Trained from `.abc` uploads, from
scratch or fine-tuning a version; `folk-tunes` ships with the package.
"""

from __future__ import annotations

from pathlib import Path

from atelier.families.base import Family, TrainError, TrainJob, decoder_context
from atelier.music.compose import Composed, TuneRequest, compose
from atelier.music.constraints import Vocabulary
from atelier.training import hyperparameters
from atelier.training.music import FAMILY, load_tune_model, train_tunes

SCRATCH_DEFAULTS = dict(n_embd=128, n_layer=2, n_head=4, context=384)


class TuneModel:
    """A version ready to write tunes: the model, its tokenizer and the mask's view of the tokens."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.vocab = Vocabulary.of(tokenizer.tokens, tokenizer.eos_id)
        self.meters = sorted(t[2:] for t in tokenizer.tokens if t.startswith("M:"))
        self.keys = sorted(t[2:] for t in tokenizer.tokens if t.startswith("K:"))

    def compose(self, request: TuneRequest, on_bar=None) -> Composed:
        return compose(self.model, self.tokenizer, self.vocab, request, on_bar=on_bar)


class AbcGpt(Family):
    name = FAMILY
    task = "music-generation"
    engine = "call"
    train_formats = ("abc",)
    fine_tunable = True
    quantizable = True
    shipped = ("folk-tunes",)

    def describe(self, config: dict, files: dict) -> dict:
        return {"context_length": config.get("n_positions")}

    def load(self, folder: Path) -> TuneModel:
        return TuneModel(*load_tune_model(folder))

    def check_hyperparameters(self, hyper: dict) -> dict:
        return hyperparameters.check(hyper, family=self.name)

    def train(self, job: TrainJob) -> Path | None:
        from atelier.training.music import tune_corpus
        from atelier.music.tokens import tokenize

        hyper = dict(job.hyperparameters)
        block = decoder_context(job, SCRATCH_DEFAULTS["context"], "abc-gpt")
        try:
            corpus, facts = read = tune_corpus(job.train_path, val_data=job.val_path)
        except ValueError as e:
            raise TrainError(str(e), param="training_file") from None
        job.stage(f"data: {facts['train_tunes']} tunes ({facts['train_sequences']} in all keys), "
                  f"{facts['val_tunes']} held out")
        tokens = sum(len(tokenize(t)) + 2 for t in corpus.train)
        model_cfg, cfg = hyperparameters.decoder_plan(hyper, block=block, fine_tune=job.base is not None,
                                                      train_tokens=tokens, seed=job.seed, max_steps_limit=job.max_steps,
                                                      defaults=SCRATCH_DEFAULTS, stage=job.stage)
        folder = train_tunes(job.train_path, job.workdir / "train", model_cfg, cfg, base=job.base,
                             val_data=job.val_path, on_event=job.on_event, should_stop=job.should_stop, read=read)
        if job.should_stop():
            return None
        job.trained_tokens = cfg.max_steps * cfg.batch_size * block
        return folder


family = AbcGpt()
