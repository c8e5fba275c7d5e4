"""Recipes: a whole pruning job as data (YAML or JSON) -- the method, its config for each target, where the dense
network comes from, and the training settings. Every job writes the recipe it resolved to ``recipe.yaml``;
``prunekit prune --config recipe.yaml`` runs it again.

A recipe is data like a checkpoint: a model factory it names is imported only when the command trusts it
(``--trust-factory``, recorded in the recipe's ``source.trusted_factories`` only when the user passed it).

>>> import prunekit
>>> source = prunekit.ModelSource(model="lenet5", data=prunekit.DataConfig("digits"))
>>> recipe = prunekit.Recipe("l1", [prunekit.L1Config(target="flops=0.25")], prunekit.JobConfig(source))
>>> prunekit.Recipe.from_yaml(recipe.to_yaml()) == recipe
True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from prunekit.configs import Config, coerce_fields, config_from_dict
from prunekit.data import DataConfig
from prunekit.recovery.distill import DistillConfig
from prunekit.training import TrainConfig

RECIPE_FORMAT = "prunekit.recipe/1"


@dataclass(frozen=True)
class ModelSource(Config):
    """Where the network to compress comes from.

    Args:
        model: A zoo name or ``package.module:function`` (a factory given here is trusted: the user named it).
        checkpoint: Its weights: a prunekit checkpoint (which names model and data itself) or a state_dict file.
        data: The dataset (default: the one the checkpoint names).
        trusted_factories: Model factories a checkpoint may import (given by the command; a recipe file's own list
            is never trusted and never written).
        dense_sha256: The fingerprint of the dense network's weights; a recipe that records it runs only on that
            network (every written recipe does).
    """

    model: str | None = None
    checkpoint: str | None = None
    data: DataConfig | None = None
    trusted_factories: tuple[str, ...] = ()
    dense_sha256: str | None = None

    def __post_init__(self) -> None:
        coerce_fields(self)
        if self.model is None and self.checkpoint is None:
            raise ValueError("give a model (a zoo name or package.module:function) and/or a checkpoint")
        object.__setattr__(self, "trusted_factories", tuple(self.trusted_factories))
        if self.checkpoint is not None:
            object.__setattr__(self, "checkpoint", str(self.checkpoint))


@dataclass(frozen=True)
class JobConfig(Config):
    """Everything a pruning job needs besides the method.

    Args:
        source: Where the dense network comes from.
        train: Optimiser settings of every training a method does (learning rate, batch size, augmentation, ...;
            the epochs come from the method's config). ``None``: lr 0.01, batch 128 and the dataset's own
            augmentation (crop for digits, crop and flip for images).
        seed: Seed of data order, scoring batches and random choices.
        measure_latency: Measure the latency of the dense and the compressed networks.
        distill: Recovery of a Hugging Face sentence encoder (``hf:`` model on a text task) by distilling the
            dense encoder's embeddings after the method (``None``: 300 steps; ``steps=0``: none). Refused for
            image models, whose recovery is the method's own fine-tuning.
    """

    source: ModelSource
    train: TrainConfig | None = None
    seed: int = 0
    measure_latency: bool = True
    distill: DistillConfig | None = None

    def __post_init__(self) -> None:
        coerce_fields(self)
        if self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        if self.train is not None and self.train.epochs != 0:
            raise ValueError(f"job.train.epochs must be 0 (got {self.train.epochs}): the epochs of a method's training "
                             "are its config's (finetune_epochs, retrain_epochs, admm_epochs, epochs)")


@dataclass(frozen=True)
class Recipe(Config):
    """A pruning job: ``method`` (a registry name) with one config per target, and the job settings.

    Args:
        method: Registered method name (``prunekit list methods``).
        configs: The method's configs, one per run (several targets make an accuracy-vs-cost curve).
        job: Source, training settings and seed.
    """

    method: str
    configs: list[Any] = field(default_factory=list)
    job: JobConfig | None = None

    def __post_init__(self) -> None:
        from prunekit.methods.registry import get_method

        spec = get_method(self.method)
        if not isinstance(self.configs, (list, tuple)):
            raise ValueError(f"a recipe's configs must be a list of {spec.config.__name__} mappings, one per run; got "
                             f"{type(self.configs).__name__}")
        configs = [c if isinstance(c, spec.config) else spec.config.from_dict(c) for c in self.configs]
        if not configs:
            raise ValueError(f"a recipe needs at least one {spec.config.__name__}")
        object.__setattr__(self, "configs", configs)
        if isinstance(self.job, dict):
            object.__setattr__(self, "job", JobConfig.from_dict(self.job))
        if not isinstance(self.job, JobConfig):
            raise ValueError("a recipe needs a job mapping (its source: model, checkpoint, data at least)")
        from prunekit.runner import run_label

        labels = [run_label(c) for c in configs]
        twice = sorted({label for label in labels if labels.count(label) > 1})
        if twice:
            raise ValueError(f"two runs of this job would both write the run folder {twice[0]!r} (the same target, or "
                             "none); give each run its own target, or run them as separate jobs")

    def to_dict(self) -> dict[str, Any]:
        return {"format": RECIPE_FORMAT, "method": self.method, "configs": [c.to_dict() for c in self.configs],
                "job": self.job.to_dict()}

    @classmethod
    def from_dict(cls, data: Any) -> Recipe:
        if not isinstance(data, dict):
            raise ValueError(f"a recipe must be a mapping, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("format", RECIPE_FORMAT)
        if version != RECIPE_FORMAT:
            raise ValueError(f"unsupported recipe format {version!r}; expected {RECIPE_FORMAT!r}")
        return config_from_dict(cls, data)

    @classmethod
    def from_yaml(cls, text: str) -> Recipe:
        try:
            data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as exc:
            raise ValueError(f"the recipe is not valid YAML ({' '.join(str(exc).split())})") from None
        return cls.from_dict(data)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)
