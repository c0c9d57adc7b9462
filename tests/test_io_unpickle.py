"""normdoctor.io.unpickle on its own: the inert unpickler never imports or calls what a pickle
names, rebuilds tensors from raw storage bytes, and refuses what it cannot read safely;
pickle_globals and unsafe_names list names without running anything."""

from __future__ import annotations

import collections
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from _malicious import CodeLoadingGuard

from normdoctor.io.archive import CheckedZip
from normdoctor.io.unpickle import InertUnpickler, Opaque, pickle_globals, unsafe_names

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # test archives


@pytest.fixture(autouse=True)
def guard(monkeypatch):
    """No unrestricted unpickler or code loader runs in these tests."""
    guard = CodeLoadingGuard(monkeypatch)
    yield guard
    assert guard.calls == [], f"reached {guard.calls}"


def _no_records(name: str) -> bytes:
    raise AssertionError(f"the pickle read no storage, yet asked for {name}")


def _inert(data: bytes, read_record=_no_records) -> tuple[object, InertUnpickler]:
    unpickler = InertUnpickler(data, read_record)
    return unpickler.load(), unpickler


def _torch_saved(obj: object, tmp_path: Path) -> tuple[object, list[str]]:
    """``obj`` written by torch.save, read back inertly from the archive's data.pkl."""
    path = tmp_path / "saved.pt"
    torch.save(obj, path)
    with CheckedZip(path) as archive:
        root, unpickler = _inert(archive.read("data.pkl"), archive.read)
    return root, unpickler.foreign


class _Reduces:
    """Pickles as a call of ``fn(*args)``: what a malicious file does."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


# ------------------------------------------------------------------ nothing named is run


def test_a_called_global_becomes_a_stand_in_that_records_its_arguments(tmp_path):
    marker = tmp_path / "ran"
    data = pickle.dumps(_Reduces(os.system, f"touch {marker}"), protocol=2)
    root, unpickler = _inert(data)
    assert isinstance(root, Opaque)
    assert root._nd_qualname == f"{os.system.__module__}.system"
    assert root._nd_args == (f"touch {marker}",)
    assert unpickler.foreign == [f"{os.system.__module__}.system"]
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_builtins_that_run_code_are_stand_ins_too(protocol):
    data = pickle.dumps(_Reduces(eval, "1 + 1"), protocol=protocol)
    root, unpickler = _inert(data)
    name = "__builtin__.eval" if protocol < 3 else "builtins.eval"  # as the file spells it
    assert isinstance(root, Opaque) and root._nd_args == ("1 + 1",)
    assert unpickler.foreign == [name]
    assert repr(root) == f"<pickled {name}>"


def test_one_stand_in_class_per_name_in_the_order_first_seen():
    data = pickle.dumps(
        [_Reduces(getattr, 1, "x"), _Reduces(eval, "2"), _Reduces(getattr, 3, "y")], protocol=4
    )
    root, unpickler = _inert(data)
    assert isinstance(root, list) and len(root) == 3
    assert unpickler.foreign == ["builtins.getattr", "builtins.eval"]
    assert type(root[0]) is type(root[2]) and type(root[0]) is not type(root[1])
    assert [item._nd_args for item in root] == [(1, "x"), ("2",), (3, "y")]


class Recorded:  # pickled by reference: the inert reader must not import this test module
    def __init__(self):
        self.state = {"a": 1}


def test_state_is_recorded_not_applied():
    root, unpickler = _inert(pickle.dumps(Recorded(), protocol=2))
    assert isinstance(root, Opaque)
    assert unpickler.foreign == [f"{__name__}.Recorded"]
    assert root._nd_state == {"state": {"a": 1}}
    assert not hasattr(root, "state")


def test_items_added_to_a_stand_in_are_recorded():
    # somewhere.else.L() then APPENDS 1, 2; somewhere.else.D() then SETITEMS k=7
    appends = b"\x80\x02csomewhere.else\nL\n)\x81(K\x01K\x02e."
    root, _ = _inert(appends)
    assert isinstance(root, Opaque) and root._nd_items == [1, 2]
    setitems = b"\x80\x02csomewhere.else\nD\n)\x81(X\x01\x00\x00\x00kK\x07u."
    root, _ = _inert(setitems)
    assert isinstance(root, Opaque) and root._nd_items == [("k", 7)]


def test_an_allowlisted_function_refuses_attributes_from_the_pickle():
    """BUILD with slot state on an allowlisted rebuilder would replace normdoctor's own
    function; the wrapper handed out refuses it."""
    data = (
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n"  # the allowlisted function
        b"N}X\x02\x00\x00\x00fncbuiltins\neval\ns\x86"  # state (None, {"fn": eval})
        b"b."  # BUILD
    )
    with pytest.raises(pickle.UnpicklingError, match="sets attributes on a function"):
        _inert(data)


def test_rebuild_from_type_only_calls_the_tensor_rebuilders():
    # _rebuild_from_type_v2(func, object, ("1",), {}) with func a foreign function, then with
    # an allowlisted function that is no tensor rebuilder
    for func in (b"cbuiltins\neval\n", b"ctorch.jit._pickle\nbuild_intlist\n"):
        data = (
            b"\x80\x02ctorch._tensor\n_rebuild_from_type_v2\n("
            + func
            + b"cbuiltins\nobject\nX\x01\x00\x00\x001\x85}tR."
        )
        root, _ = _inert(data)
        assert isinstance(root, Opaque), func  # not eval("1"), not ["1"]


def test_a_tensor_rebuilder_without_raw_storage_gives_a_stand_in():
    # _rebuild_tensor_v2(<not a storage>, 0, (1,), (1,))
    data = (
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n"
        b"(K\x01K\x00K\x01\x85K\x01\x85tR."  # args (1, 0, (1,), (1,))
    )
    root, _ = _inert(data)
    assert isinstance(root, Opaque)


# --------------------------------------------------------------- tensors from raw bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64, torch.bool])
def test_tensors_are_rebuilt_from_the_storage_bytes(tmp_path, dtype):
    tensor = (torch.arange(12).reshape(3, 4) % 3).to(dtype)
    root, foreign = _torch_saved({"t": tensor, "p": torch.nn.Parameter(tensor.float())}, tmp_path)
    assert foreign == []
    assert isinstance(root, dict)
    assert root["t"].dtype == dtype and torch.equal(root["t"], tensor)
    assert torch.equal(root["p"], tensor.float())


def test_views_keep_their_offset_stride_and_shared_storage(tmp_path):
    base = torch.arange(20, dtype=torch.float32)
    view = base[5:15].reshape(2, 5).t()  # offset 5, non-contiguous
    root, _ = _torch_saved([base, view], tmp_path)
    a, b = root
    assert torch.equal(b, view) and b.stride() == view.stride()
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()  # one storage read


def test_rebuilt_tensors_own_their_bytes():
    """The tensors sit on a private, writable copy of the record (asked for by its key)."""
    record = torch.ones(4).numpy().tobytes()
    asked = []
    root, _ = _inert(_pickled_storage_tensor(4), lambda name: asked.append(name) or record)
    assert asked == ["data/0"]
    root.add_(1)
    assert torch.equal(root, torch.full((4,), 2.0))
    assert record == torch.ones(4).numpy().tobytes()


def _pickled_storage_tensor(numel: int, key: str = "0") -> bytes:
    """``_rebuild_tensor_v2(<FloatStorage key>, 0, (numel,), (1,))`` as torch.save writes it."""
    return (
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n("
        b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\n"
        + b"X"
        + len(key).to_bytes(4, "little")
        + key.encode()
        + b"X\x03\x00\x00\x00cpuK"
        + bytes([numel])
        + b"tQ"  # persistent id tuple, BINPERSID
        + b"K\x00K"
        + bytes([numel])
        + b"\x85K\x01\x85tR."
    )


def test_storage_bytes_that_do_not_fit_the_dtype_are_refused():
    with pytest.raises(pickle.UnpicklingError, match=r"holds 7 bytes, not torch\.float32"):
        _inert(_pickled_storage_tensor(2), lambda name: b"\x00" * 7)


def test_a_view_beyond_its_storage_fails_instead_of_reading_other_memory():
    with pytest.raises(RuntimeError):
        _inert(_pickled_storage_tensor(8), lambda name: b"\x00" * 16)  # 4 floats, 8 claimed


@pytest.mark.parametrize(
    "pid",
    [b"X\x04\x00\x00\x00evil", b"(X\x06\x00\x00\x00moduleX\x01\x00\x00\x00xt"],
    ids=["string", "foreign-tuple"],
)
def test_persistent_ids_other_than_storages_are_refused(pid):
    with pytest.raises(pickle.UnpicklingError, match="unsupported persistent id"):
        _inert(b"\x80\x02" + pid + b"Q.")


def test_the_container_types_and_dtypes_are_the_real_ones(tmp_path):
    obj = {
        "od": collections.OrderedDict(a=1),
        "set": {1, 2},
        "frozen": frozenset({3}),
        "size": torch.Size([2, 3]),
        "dtype": torch.float16,
    }
    root, foreign = _torch_saved(obj, tmp_path)
    assert foreign == []
    assert type(root["od"]) is collections.OrderedDict and root["od"] == {"a": 1}
    assert root["set"] == {1, 2} and root["frozen"] == frozenset({3})
    assert root["size"] == (2, 3)
    assert root["dtype"] is torch.float16


def test_a_pickled_module_is_a_tree_of_stand_ins_with_its_tensors(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    path = tmp_path / "m.pt"
    torch.save(model, path)
    with CheckedZip(path) as archive:
        root, unpickler = _inert(archive.read("data.pkl"), archive.read)
    assert isinstance(root, Opaque)
    assert root._nd_qualname == "torch.nn.modules.container.Sequential"
    bn = root._nd_state["_modules"]["1"]
    assert torch.equal(bn._nd_state["_buffers"]["running_var"], torch.ones(3))
    assert "torch.nn.modules.batchnorm.BatchNorm1d" in unpickler.foreign


def test_garbage_raises_an_unpickling_error_not_anything_worse():
    for data in (b"", b"\x80\x02", b"not a pickle at all", b"\x80\x02}q\x00(X"):
        with pytest.raises((pickle.UnpicklingError, EOFError, ValueError, IndexError)):
            _inert(data)


# ------------------------------------------------------------------------ pickle_globals


def test_pickle_globals_lists_every_import_without_running_any():
    data = pickle.dumps(
        [_Reduces(os.system, "x"), _Reduces(eval, "y"), collections.OrderedDict()], protocol=0
    )
    names = pickle_globals(data)
    assert f"{os.system.__module__}.system" in names
    assert "__builtin__.eval" in names  # protocols 0-2 spell Python 2's module names
    assert "collections.OrderedDict" in names
    assert len(names) == len(set(names))


def test_pickle_globals_reads_stack_global_and_back_to_back_pickles():
    first = pickle.dumps(_Reduces(eval, "1"), protocol=4)  # STACK_GLOBAL
    second = pickle.dumps(_Reduces(exec, "2"), protocol=4)
    names = pickle_globals(first + second)
    assert names == ["builtins.eval", "builtins.exec"]
    assert pickle_globals(first + second, pickles=1) == ["builtins.eval"]


def test_pickle_globals_reports_what_it_read_before_damage():
    data = pickle.dumps(_Reduces(eval, "1"), protocol=4)
    assert pickle_globals(data[:-1] + b"\xff\xff garbage") == ["builtins.eval"]
    assert pickle_globals(b"") == []


def test_pickle_globals_of_a_legacy_torch_file(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save(_LegacyPayload(), path, _use_new_zipfile_serialization=False)
    assert f"{__name__}._LegacyPayload" in pickle_globals(path.read_bytes())


class _LegacyPayload:
    pass


# -------------------------------------------------------------------------- unsafe_names


def test_unsafe_names_leaves_out_torch_and_the_containers():
    names = [
        "torch._utils._rebuild_tensor_v2",
        "collections.OrderedDict",
        "builtins.set",
        "__torch__.MyModule",
        "mypkg.Net",
    ]
    assert unsafe_names(names) == ["__torch__.MyModule", "mypkg.Net"]


def test_unsafe_names_falls_back_to_all_when_every_name_is_torch():
    names = ["torch.nn.modules.linear.Linear", "collections.OrderedDict"]
    assert unsafe_names(names) == names


# ------------------------------------------------------------------- zip archives, end to end


def test_a_torchscript_archive_reads_inertly(tmp_path):
    scripted = torch.jit.script(torch.nn.BatchNorm1d(2))
    path = tmp_path / "ts.pt"
    torch.jit.save(scripted, path)
    with zipfile.ZipFile(path) as zf:
        assert any(n.endswith("constants.pkl") for n in zf.namelist())
    with CheckedZip(path) as archive:
        root, unpickler = _inert(archive.read("data.pkl"), archive.read)
    assert isinstance(root, Opaque) and root._nd_qualname.startswith("__torch__.")
    state = root._nd_state
    assert torch.equal(state["running_var"], torch.ones(2))
    assert any(n.startswith("__torch__.") for n in unpickler.foreign)
