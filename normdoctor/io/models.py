"""Loading the model files people actually have, without running code they did not ask to run.

Formats are recognised by content first (the extension only breaks ties):

* zip with ``data.pkl``: a ``torch.save`` archive holding a state_dict (plain, wrapped under
  ``state_dict``/``model``/``model_state_dict``/..., or a Lightning ``.ckpt``), a
  normdoctor-patched checkpoint, or a whole pickled ``nn.Module``;
* zip with ``code/`` and ``constants.pkl``: a TorchScript archive (``torch.jit.save``);
* zip with ``archive_format`` or ``models/``: a ``torch.export`` program (``.pt2``);
* a pickle protocol byte first: a legacy (non-zip) ``torch.save`` file;
* an 8-byte header length then ``{``: safetensors;
* ``.onnx`` (or an ONNX protobuf): handed to :mod:`normdoctor.sources.onnx`;
* a folder with ``config.json`` (Hugging Face ``save_pretrained``): built offline with
  ``transformers`` from the config, weights read as above (:mod:`normdoctor.io.hf`).

A Lightning ``.ckpt`` also carries the ``hyper_parameters`` its module was built with: the plain
ones that ``arch`` takes complete ``arch_kwargs`` (explicit ``arch_kwargs`` win).

Safety: nothing read from a file is unpickled with the full Python unpickler, and no loader
that runs code stored in a file is called, unless ``trust_pickle`` is set.  Zip archives are
first checked to have a single reading (:mod:`normdoctor.io.archive`: no duplicate names, no
stray bytes, one top folder), so that PyTorch's zip reader and Python's see the same entries.
``torch.load`` always runs with ``weights_only=True`` (on an open file: by name torch would send
``*.safetensors`` to safetensors whatever it holds).  When that refuses, the file's pickle is read
by the *inert* unpickler of :mod:`normdoctor.io.unpickle`, which never imports or calls anything
the file names: every class or function it references becomes a stand-in that only records its
arguments, and tensors are rebuilt by normdoctor from the raw storage bytes.  That is enough to
recover the weights of a pickled module, of a checkpoint that also holds arbitrary training
objects, and of a TorchScript archive, for the static checks or to load into ``arch``.
``torch.jit.load`` is never called: it runs TorchScript code stored in the archive
(``__setstate__``) while loading, and PyTorch does not treat TorchScript loading as a security
boundary.  ``torch.export.load`` is only called with ``trust_pickle``: without it
:mod:`normdoctor.io.pt2` reads the archive itself and hands torch's deserializer only checked
objects (see there for what ``torch.export.load`` would run).

The loader is a small package: :mod:`~normdoctor.io.sniff` tells what a file is by its bytes,
:mod:`~normdoctor.io.checkpoint` reads the containers (state dicts, Lightning and patched
checkpoints, pickled modules through the inert unpickler of :mod:`~normdoctor.io.unpickle`),
:mod:`~normdoctor.io.align` loads state dicts into models whatever their key prefixes,
:mod:`~normdoctor.io.pt2` and :mod:`~normdoctor.io.unflatten` read and rebuild ``.pt2``
programs, :mod:`~normdoctor.io.arch` imports and builds ``--arch``, and this module puts them
together.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LoadError
from . import hf
from .align import load_state_dict_into
from .arch import build_arch, import_object, resolve_arch
from .checkpoint import (  # PATCH_KEY, PATCH_VERSION, WRAPPER_KEYS: re-exported, lived here
    PATCH_KEY,  # noqa: F401
    PATCH_VERSION,  # noqa: F401
    WRAPPER_KEYS,  # noqa: F401
    CheckpointFormat,
    Contents,
    apply_patch_manifest,
    load_onnx_model,
    read_contents,
    read_safetensors,
    read_torch_file,
    refusal,
)
from .sniff import Kind, check_path, sniff
from .unflatten import ExportedBatchNorm  # noqa: F401  (re-exported: it lived here)

__all__ = [
    "Checkpoint",
    "CheckpointFormat",
    "import_object",
    "load_checkpoint",
    "load_model",
    "load_state_dict_into",
    "resolve_arch",
]


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Checkpoint:
    """A model file read for the data-free static checks; no architecture needed.

    Attributes:
        path: the file.
        format: what it holds.
        state_dict: every tensor found, keyed as in ``state_dict()`` (``None`` when the file holds
            none, e.g. an ONNX graph without normalization nodes).
        module: the live module when one could be rebuilt without running untrusted code
            (``.pt2``) or was unpickled with ``trust_pickle=True``; else ``None``.
        layer_info: per module name, attributes recovered without running code: ``kind`` (class
            name), and where stored ``eps``, ``momentum``, ``track_running_stats``, ``affine``.
            Used by :func:`normdoctor.checks.static_checks_for` when ``module`` is ``None``.
        manifest: the conversion manifest of a normdoctor-patched checkpoint.
        notes: one-line remarks about how the file was read.
    """

    path: Path
    format: CheckpointFormat
    state_dict: dict[str, torch.Tensor] | None
    module: nn.Module | None = None
    layer_info: dict[str, dict[str, Any]] = field(default_factory=dict)
    manifest: dict[str, Any] | None = None
    notes: tuple[str, ...] = ()


# ------------------------------------------------------------------ Hugging Face folders


def _read_hf_weights(folder: Path, map_location: Any) -> tuple[dict[str, torch.Tensor], str]:
    """Every tensor of a folder's weight files (shards merged), and the files' description."""
    files = hf.weight_files(folder)
    sd: dict[str, torch.Tensor] = {}
    for file in files:
        if file.stat().st_size == 0:
            raise LoadError(f"{file} is empty (0 bytes)")
        sniffed = sniff(file)
        if sniffed.kind is Kind.SAFETENSORS:
            part = read_safetensors(file, map_location)
        elif sniffed.kind in (Kind.TORCH_ZIP, Kind.LEGACY):
            part = read_torch_file(file, sniffed, trust_pickle=False, map_location=map_location)
        else:
            raise LoadError(f"{file}: not a safetensors or torch.save weight file")
        if part.format not in (CheckpointFormat.STATE_DICT, CheckpointFormat.SAFETENSORS):
            raise LoadError(f"{file} holds {part.format} data, not weights")
        assert part.state_dict is not None
        sd.update(part.state_dict)
    what = files[0].name if len(files) == 1 else f"{len(files)} shards ({files[0].name}, ...)"
    return sd, what


def _read_hf_folder(folder: Path, *, build: bool) -> Contents:
    """A save_pretrained folder for the static checks: its weights, and the module when
    transformers is installed (layers from buffer names alone without it)."""
    sd, what = _read_hf_weights(folder, "cpu")
    notes = [f"weights read from {what}"]
    module = None
    if build:
        try:
            module, built = hf.build_model(folder)
        except LoadError as exc:
            if "pip install" not in str(exc):
                raise
            notes.append(f"model not built ({hf.HF_EXTRA_HINT} to build it): buffer names only")
        else:
            _load_hf_weights(module, sd, folder)
            notes += built
    return Contents(CheckpointFormat.HUGGINGFACE, state_dict=sd, module=module, notes=notes)


def _load_hf_weights(model: nn.Module, sd: dict[str, torch.Tensor], folder: Path) -> list[str]:
    sd = dict(sd)
    tied = hf.fill_tied(model, sd)
    notes = load_state_dict_into(model, sd, source=f"weights in {folder.name}")
    if tied:
        notes.append(f"{len(tied)} tied weights taken from the tensors they share")
    model.eval()  # as transformers' from_pretrained returns it
    return notes


def _load_hf_folder(
    folder: Path,
    arch: str | Callable[..., nn.Module] | None,
    arch_kwargs: Mapping[str, Any] | None,
    map_location: Any,
) -> nn.Module:
    sd, what = _read_hf_weights(folder, "cpu")
    if arch is not None:  # the user's own class for the folder's weights: no transformers
        model = resolve_arch(arch, arch_kwargs)
        notes = load_state_dict_into(model, sd, source=f"weights in {folder.name}")
        _warn(folder, [n for n in notes if n.startswith("ignored")])
        built = [f"weights read from {what} into arch {arch!r}"]
    else:
        model, built = hf.build_model(folder)
        notes = _load_hf_weights(model, sd, folder)
        _warn(folder, [n for n in notes if n.startswith("ignored")])
        built = [f"{built[0]}; weights read from {what}"]
    if map_location not in (None, "cpu"):
        model.to(map_location)
    return _mark_source(model, folder, built)


def load_checkpoint(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> Checkpoint:
    """Read a model file for the data-free static checks; no architecture needed.

    Every format :func:`load_model` reads.  Weights of pickled modules and TorchScript archives
    are recovered without unpickling or running anything (see the module docstring); with
    ``trust_pickle=True`` a pickled module is unpickled and returned as ``module``.  A ``.pt2``
    program comes with its unflattened ``module`` (see :func:`load_model`).

    Raises:
        LoadError: with a one-line reason.
    """
    if hf.is_model_folder(Path(path)):
        c = _read_hf_folder(Path(path), build=True)
        p = Path(path)
    else:
        p = check_path(path)
        c = read_contents(p, sniff(p), trust_pickle=trust_pickle, map_location="cpu")
    state_dict = c.state_dict
    if state_dict is None and c.module is not None:
        state_dict = {k: v.detach() for k, v in c.module.state_dict().items()}
    return Checkpoint(
        path=p,
        format=c.format,
        state_dict=state_dict,
        module=c.module,
        layer_info=c.layer_info,
        manifest=c.manifest,
        notes=tuple(c.notes),
    )


def load_model(
    path: str | os.PathLike[str],
    arch: str | Callable[..., nn.Module] | None = None,
    *,
    arch_kwargs: Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
    map_location: str | torch.device | None = "cpu",
) -> nn.Module:
    """Load a model for scanning, exactly as stored or built (``.eval()`` is *not* called).

    Args:
        path: the model file; recognised by content (see the module docstring).
        arch: for weights-only files (state_dict, safetensors, patched checkpoints): the
            architecture as ``package.module:factory`` or ``path/to/file.py:ClassName`` (or a
            callable), called with ``arch_kwargs``.  Key prefixes added by DataParallel/DDP
            (``module.``), torch.compile (``_orig_mod.``) and Lightning (``model.``, ``net.``)
            are matched automatically.  Given for a ``.pt2``, TorchScript or untrusted pickled
            module file, the file's weights are loaded into it instead.
        arch_kwargs: keyword arguments for ``arch``.  For a Lightning checkpoint, the
            checkpoint's plain ``hyper_parameters`` that ``arch`` accepts are added (explicit
            ``arch_kwargs`` win); the model's ``normdoctor_load_notes`` says which.
        trust_pickle: unpickle whole pickled modules (``torch.save(model)``) and archives with
            pickled objects with the full unpickler, which runs code from the file.
        map_location: device for the weights.

    Returns:
        An ``nn.Module``, with the resolved input path in its ``normdoctor_source`` attribute (the
        patcher refuses to overwrite that file) and one-line remarks about how it was built in
        ``normdoctor_load_notes``; for ``.onnx`` files an ``OnnxModel`` from
        :mod:`normdoctor.sources.onnx`.  For a Hugging Face folder (``config.json`` with
        ``model.safetensors``) the ``transformers`` model its config describes, in eval mode as
        ``from_pretrained`` gives it (needs ``normdoctor[hf]``; with ``arch``, the folder's
        weights go into ``arch`` instead and ``transformers`` is not needed).

    Note:
        ``.pt2`` (torch.export): the program is unflattened with ``torch.export.unflatten`` so
        that norm layers are modules again.  An unflattened BatchNorm call site bakes in the mode
        it was exported in (``aten.batch_norm(..., training=False, ...)``): toggling
        ``training`` on it changes nothing, so the train path could not be measured.  Each call
        site whose graph is exactly one ``batch_norm`` (or instance/group/layer norm) op on the
        module's own tensors is therefore replaced by the equivalent ``nn.BatchNorm1d/2d/3d``
        (``nn.InstanceNorm*``, ``nn.GroupNorm``, ``nn.LayerNorm``) holding the very same tensors,
        with eps and momentum read from the call; the rest of the graph runs as exported.  Call
        sites that do not match stay as they are and count as frozen layers (running statistics
        on both paths), with a warning.  A program exported in eval mode has no dropout; one
        exported in train mode keeps dropout active on both paths (warned).  ``momentum=None``
        (cumulative average) is exported as momentum 0.0 and reads back as such.

        TorchScript: ``torch.jit.load`` is never called, and a scripted module cannot be probed
        (no Python forward pre-hooks on ScriptModules), so without ``arch`` this raises a
        :class:`LoadError` saying what to do; :func:`load_checkpoint` still gives the static
        checks.

    Raises:
        LoadError: a one-line reason (missing, empty, truncated or unrecognised file, an
            architecture that does not import or does not fit, a refused pickle, ...).
    """
    if hf.is_model_folder(Path(path)):
        return _load_hf_folder(Path(path), arch, arch_kwargs, map_location)
    p = check_path(path)
    sniffed = sniff(p)
    if sniffed.kind is Kind.ONNX:
        return load_onnx_model(p)
    if sniffed.kind is Kind.TORCHSCRIPT and arch is None:
        raise LoadError(
            f"{p} is a TorchScript archive: scripted modules cannot be probed (no Python hooks); "
            "pass the Python architecture with --arch to load its weights, or save the model "
            "with torch.export.save (.pt2) or as a state_dict"
        )
    c = read_contents(p, sniffed, trust_pickle=trust_pickle, map_location=map_location)
    if c.module is not None and (arch is None or c.format is CheckpointFormat.PICKLE):
        if arch is not None:
            warnings.warn(
                f"{p} holds a whole module; arch {arch!r} is not used", UserWarning, stacklevel=2
            )
        _warn(p, c.caveats)
        return _mark_source(c.module, p)
    if arch is None:
        if c.format is CheckpointFormat.PICKLE:
            raise refusal(p, c.refused or [])
        what = {
            CheckpointFormat.PATCHED: "a normdoctor-patched state_dict",
            CheckpointFormat.SAFETENSORS: "weights only (safetensors)",
        }.get(c.format, "a state_dict (weights only)")
        raise LoadError(
            f"{p} holds {what}: pass the architecture with --arch package.module:factory or "
            "path/to/file.py:ClassName (arch=...)"
        )
    model, built = build_arch(arch, arch_kwargs, c.hyper_parameters)
    if c.format is CheckpointFormat.PATCHED:
        assert c.manifest is not None
        model = apply_patch_manifest(model, c.manifest, p)
    assert c.state_dict is not None
    try:
        notes = load_state_dict_into(model, c.state_dict, source=f"state_dict in {p.name}")
    except LoadError as exc:
        if not built:
            raise
        raise LoadError(f"{exc} ({built})") from exc
    if map_location not in (None, "cpu"):
        model.to(map_location)
    _warn(p, [n for n in notes if n.startswith("ignored")])
    return _mark_source(model, p, [built] if built else [])


def _mark_source(model: nn.Module, path: Path, notes: list[str] | None = None) -> nn.Module:
    """Record the input file on the model, so that normdoctor.patch never overwrites it, and
    what loading decided that the user should hear (``normdoctor_load_notes``)."""
    target: Any = model  # nn.Module's __setattr__ is typed for tensors and modules only
    with contextlib.suppress(Exception):  # a user class may forbid new attributes
        target.normdoctor_source = str(path.resolve())
        target.normdoctor_load_notes = tuple(notes or ())
    return model


def _warn(path: Path, caveats: list[str]) -> None:
    for caveat in caveats:
        warnings.warn(f"{path.name}: {caveat}", UserWarning, stacklevel=3)
