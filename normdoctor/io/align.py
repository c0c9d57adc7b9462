"""Loading a state_dict into a model whose keys it may spell differently: DataParallel/DDP and
torch.compile wrappers, Lightning's ``model.``/``net.`` prefixes, any one common first segment."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..errors import LoadError, one_line
from ._messages import listing

__all__ = ["load_state_dict_into"]


def _strip_wrappers(key: str) -> str:
    while key.startswith("module."):
        key = key[len("module.") :]
    return key.replace("_orig_mod.", "")


def _align_keys(
    sd: Mapping[str, torch.Tensor], expected: set[str]
) -> tuple[dict[str, torch.Tensor], int, str]:
    """Rename checkpoint keys to the model's: (renamed, keys left out, how).

    Tries the keys as they are, without DataParallel/DDP ``module.`` and torch.compile
    ``_orig_mod.`` wrappers, then under one common prefix (Lightning's ``model.``/``net.``,
    any other first segment).  A candidate is taken only when it gives exactly the model's keys
    (``num_batches_tracked`` may be missing); otherwise the closest one is returned and the
    caller reports the mismatch.
    """
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    required = expected - optional

    def fits(keys: set[str]) -> bool:
        return required <= keys <= expected

    base: list[tuple[str, dict[str, torch.Tensor]]] = [("", dict(sd))]
    stripped = {_strip_wrappers(k): v for k, v in sd.items()}
    if len(stripped) == len(sd) and stripped.keys() != sd.keys():
        base.append(("without the 'module.'/'_orig_mod.' wrapper prefixes", stripped))
    best: tuple[int, dict[str, torch.Tensor], int, str] | None = None
    for how, cand in base:
        if fits(set(cand)):
            return cand, 0, how
        firsts = sorted({k.split(".", 1)[0] for k in cand if "." in k})
        prefixes: list[str] = [
            p for p in ("model", "net", "network", "module", "backbone") if p in firsts
        ]
        prefixes += [p for p in firsts if p not in prefixes]
        for p in prefixes:
            sub = {k[len(p) + 1 :]: v for k, v in cand.items() if k.startswith(p + ".")}
            if fits(set(sub)):
                note = f"under the prefix '{p}.'" + (f", {how}" if how else "")
                return sub, len(cand) - len(sub), note
            overlap = len(set(sub) & expected)
            if best is None or overlap > best[0]:
                best = (overlap, sub, len(cand) - len(sub), f"under the prefix '{p}.'")
        overlap = len(set(cand) & expected)
        if best is None or overlap >= best[0]:
            best = (overlap, cand, 0, how)
    assert best is not None
    return best[1], best[2], best[3]


def load_state_dict_into(
    model: nn.Module, sd: Mapping[str, torch.Tensor], *, source: str = "checkpoint"
) -> list[str]:
    """Copy ``sd`` into ``model`` after aligning key prefixes; returns notes.

    Raises:
        LoadError: keys or shapes do not fit, listing the first few offenders and their count.
    """
    expected_sd = model.state_dict()
    expected = set(expected_sd)
    aligned, dropped, how = _align_keys(sd, expected)
    missing = sorted(k for k in expected - set(aligned) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(aligned) - expected)
    label = type(model).__name__
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({listing(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({listing(unexpected)})")
        raise LoadError(
            f"the {source} does not fit architecture {label}: {'; '.join(parts)}"
            + (f" [keys compared {how}]" if how else "")
        )
    wrong = [
        f"{k}: {tuple(aligned[k].shape)} vs {tuple(expected_sd[k].shape)}"
        for k in sorted(aligned)
        if tuple(aligned[k].shape) != tuple(expected_sd[k].shape)
    ]
    if wrong:
        raise LoadError(
            f"the {source} does not fit architecture {label}: {len(wrong)} shape mismatches "
            f"(checkpoint vs model; {listing(wrong)})"
        )
    try:
        model.load_state_dict(aligned, strict=False)
    except RuntimeError as exc:
        raise LoadError(f"the {source} does not fit architecture {label}: {one_line(exc)}") from exc
    notes = []
    if how:
        notes.append(f"weights matched {how}")
    if dropped:
        notes.append(f"ignored {dropped} checkpoint keys outside the model")
    return notes
