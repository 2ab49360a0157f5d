"""Kiln's training recipes: datasets that ship inside pip packages, turned into the tensors a
declared model trains on, with the preprocessing a server must repeat.

A recipe fills in what the declaration leaves to training (image mean/std, feature names and
statistics, labels, output names) and says how the model is scored (loss and metrics by
output kind). Names only here at import: torch and the datasets load when a recipe runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

RECIPES = ("mnist", "breast_cancer", "diabetes", "digit_tokens")
# What each recipe's data is: the kind of its first input and of its output.
RECIPE_DATASET = {"mnist": "mnist", "breast_cancer": "breast_cancer", "diabetes": "diabetes",
                  "digit_tokens": "digits"}


@dataclass
class Prepared:
    """Tensors per split ((inputs...), target), and the declaration's blanks filled in."""

    splits: dict
    inputs: list[dict]
    output: dict
    sha256: str
    split_sizes: dict
    background: float | None = None  # the standardised image background, for augmentation
    baseline: dict = field(default_factory=dict)  # a reference model's test metrics


def prepare(decl) -> Prepared:
    import torch

    from kiln.training import data

    ds = data.load(RECIPE_DATASET[decl.recipe])
    inputs = [dict(spec) for spec in decl.inputs]
    output = dict(decl.output)
    background = None
    if decl.recipe == "mnist":
        (spec,) = inputs
        mean, std = data.image_stats(ds.train)
        spec.update(size=[28, 28], pixel_max=255, mean=[mean], std=[std])
        pad = spec.get("pad", 0)

        def to_inputs(x):
            return (data.image_tensor(x, pad, mean, std),)

        background = (0.0 - mean) / std
    elif decl.recipe in ("breast_cancer", "diabetes"):
        (spec,) = inputs
        mean_v, std_v = data.feature_stats(ds.train)
        spec.update(names=ds.feature_names, mean=mean_v, std=std_v)

        def to_inputs(x):
            return (data.feature_tensor(x, mean_v, std_v),)
    else:  # digit_tokens: each 8x8 digit as a variable-length sequence of pixel tokens
        def to_inputs(x):
            ids, mask = data.digit_tokens(x)
            return torch.from_numpy(ids), torch.from_numpy(mask)

    if output["kind"] == "regression":
        output.setdefault("names", ds.labels)
    else:
        output.setdefault("labels", ds.labels)
    target_dtype = torch.float32 if output["kind"] == "regression" else torch.int64
    splits = {
        part: (to_inputs(getattr(ds, part).x),
               torch.from_numpy(getattr(ds, part).y).to(target_dtype))
        for part in ("train", "val", "test")
    }
    sizes = {part: len(getattr(ds, part).y) for part in ("train", "val", "test")}
    baseline = data.linear_baseline(ds) if output["kind"] == "regression" else {}
    return Prepared(splits, inputs, output, ds.sha256, sizes, background, baseline)
