"""sklearn: classical pipelines on tables (atelier/models/tabular.py, stored with skops).

Served by `POST /api/models/{model}/predict` (rows in, predictions out, `explain` for per-feature
contributions), one call at a time; /v1/models shows each version's feature importances;
trained from CSV / JSON-lines tables, or as a fusion (voting, stacking) of trained versions.
A version's task is classification or regression, decided when it was trained.
"""

from __future__ import annotations

from pathlib import Path

from atelier.families.base import Family, TrainError, TrainJob
from atelier.models import tabular


class Sklearn(Family):
    name = tabular.FAMILY
    task = "classification"  # or regression: see task_of
    engine = "call"
    train_formats = ("csv", "jsonl-table")

    def task_of(self, config: dict) -> str:
        return config.get("task", "regression")

    def describe(self, config: dict, files: dict) -> dict:
        """Features and target; what the model relies on (versions trained before importances: null);
        and whether `explain` works (versions trained before baselines were recorded: no)."""
        return {"features": config.get("features"), "target": config.get("target"),
                "feature_importances": config.get("feature_importances"),
                "feature_importances_method": config.get("feature_importances_method"),
                "explainable": config.get("baseline") is not None}

    def load(self, folder: Path) -> tabular.TabularModel:
        """The fitted pipeline (skops, trusted types only); it predicts through `predict`/`predict_proba`."""
        return tabular.load(folder)

    def check_hyperparameters(self, hyper: dict) -> dict:
        """What can be checked before the table is read; the tabular trainer checks the rest."""
        from atelier.training.tabular import ESTIMATORS, FUSE_KEYS, HYPER_KEYS

        keys = [k for k in hyper if k != "fuse"] if "fuse" in hyper else list(hyper)
        allowed = FUSE_KEYS if "fuse" in hyper else HYPER_KEYS
        for name in keys:
            if name not in allowed:
                raise TrainError(f"unknown hyper-parameter {name!r}; accepted: {', '.join(allowed)}",
                                 param="hyperparameters")
        if "fuse" not in hyper and not isinstance(hyper.get("target"), str):
            raise TrainError("hyperparameters.target must name the column to predict", param="hyperparameters.target")
        if "estimator" in hyper and hyper["estimator"] not in ESTIMATORS:
            raise TrainError(f"hyperparameters.estimator={hyper['estimator']!r} is not one of "
                             f"{', '.join(ESTIMATORS)}", param="hyperparameters.estimator")
        cv = hyper.get("cv", 5)
        if not isinstance(cv, int) or isinstance(cv, bool) or not 2 <= cv <= 20:
            raise TrainError(f"hyperparameters.cv={cv!r} must be an integer from 2 to 20", param="hyperparameters.cv")
        return hyper

    def train(self, job: TrainJob) -> Path | None:
        """A pipeline trained on the table, or (hyperparameters.fuse) a fusion of trained versions."""
        from atelier.training.tabular import TabularError, fuse, train_tabular

        hyper = dict(job.hyperparameters)
        try:
            if "fuse" not in hyper:
                job.stage("building the model: sklearn pipeline")
                return train_tabular(job.train_path, hyper | {"seed": job.seed}, job.workdir / "train",
                                     on_event=job.on_event, validation_path=job.val_path)
            spec = hyper.pop("fuse")
            refs = spec.get("members", []) if isinstance(spec, dict) else []
            folders = []
            for ref in refs:
                try:
                    version, folder = job.version_folder(ref)
                except (LookupError, ValueError) as e:
                    raise TrainError(f"fusion member {ref!r}: {e}", param="hyperparameters.fuse.members") from None
                if version.model.family != self.name:
                    raise TrainError(f"fusion member {ref!r} is a {version.model.family} model, not sklearn",
                                     param="hyperparameters.fuse.members")
                folders.append(folder)
            job.stage(f"building the model: {spec.get('method', 'voting')} fusion of {', '.join(refs)}")
            extra = {k: spec[k] for k in ("weights", "cv") if k in spec}
            return fuse(folders, spec.get("method", "voting"), job.train_path,
                        hyper | extra | {"members": refs, "seed": job.seed}, job.workdir / "train",
                        on_event=job.on_event)
        except TabularError as e:
            param = e.param if e.param in (None, "training_file", "validation_file") else f"hyperparameters.{e.param}"
            raise TrainError(str(e), param=param) from None


family = Sklearn()
