"""Taps (normdoctor.taps): a module's inputs seen through a forward wrapper, put back exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normdoctor.taps import tap


def test_a_tap_sees_every_call_and_leaves_nothing_behind():
    bn = nn.BatchNorm1d(3).eval()
    seen = []
    t = tap(bn, lambda m, args: seen.append((m, args[0].clone())))
    assert "forward" in bn.__dict__  # the wrapper, not a hook
    assert not bn._forward_pre_hooks
    x = torch.randn(4, 3)
    torch.testing.assert_close(bn(x), nn.functional.batch_norm(
        x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.1, bn.eps
    ))  # fmt: skip
    assert len(seen) == 1 and seen[0][0] is bn and torch.equal(seen[0][1], x)
    t.remove()
    t.remove()  # idempotent
    assert "forward" not in bn.__dict__
    bn(x)
    assert len(seen) == 1


def test_user_hooks_run_around_the_tap_and_it_sees_what_forward_gets():
    bn = nn.BatchNorm1d(3).eval()
    bn.register_forward_pre_hook(lambda m, args: (args[0] * 2,))  # the user's own
    seen = []
    t = tap(bn, lambda m, args: seen.append(args[0]))
    x = torch.ones(2, 3)
    bn(x)
    assert torch.equal(seen[0], 2 * x)  # the input the layer normalizes
    t.remove()
    assert len(bn._forward_pre_hooks) == 1  # the user's hook is untouched


def test_an_instance_forward_is_put_back_and_a_later_wrapper_survives_removal():
    bn = nn.BatchNorm1d(3).eval()
    original = bn.forward
    calls = []

    def own(x):
        calls.append("own")
        return original(x)

    bn.forward = own  # the user's (or a library's) instance forward
    t = tap(bn, lambda m, args: calls.append("tap"))
    bn(torch.randn(2, 3))
    assert calls == ["tap", "own"]
    inner = bn.forward

    def later(x):  # something wraps forward after the tap
        calls.append("later")
        return inner(x)

    bn.forward = later
    t.remove()
    calls.clear()
    bn(torch.randn(2, 3))
    assert calls == ["later", "own"]  # the tap is a pass-through now; nothing torn out
    assert bn.__dict__["forward"] is later


def test_release_follows_the_call_even_when_it_raises():
    bn = nn.BatchNorm1d(3).eval()
    log = []
    t = tap(bn, lambda m, args: log.append("before") or True, lambda m: log.append("release"))
    with pytest.raises(RuntimeError):
        bn(torch.randn(2, 5))  # wrong channel count: BatchNorm raises
    assert log == ["before", "release"]
    t.remove()
