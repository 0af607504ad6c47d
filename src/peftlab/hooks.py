"""One place that wires PEFT modules into a frozen backbone through forward hooks.

Modules never replace backbone modules: they register callbacks on *host* modules (a linear layer, an
attention module, the model itself). The registry installs at most one hook per host and phase, and only
for callbacks whose adapter is active and not merged, so a merged model runs the bare backbone code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

#: Attribute on an attention module that holds the prefix callbacks read by the attention function.
PREFIX_ATTR = "_peftlab_prefix"


@dataclass
class Callback:
    owner: Any  # a PeftModule; it has .adapter_name and .merged
    fn: Callable


class HookRegistry:
    """Callbacks per (host, phase); phases: ``pre`` (x -> x), ``post`` ((x, y) -> y), ``prefix``, ``kwargs``."""

    def __init__(self) -> None:
        self._callbacks: dict[tuple[int, str], list[Callback]] = {}
        self._hosts: dict[int, nn.Module] = {}
        self._handles: list[Any] = []
        self._prefix_hosts: list[nn.Module] = []

    def add(self, host: nn.Module, phase: str, owner: Any, fn: Callable) -> None:
        self._hosts[id(host)] = host
        self._callbacks.setdefault((id(host), phase), []).append(Callback(owner, fn))

    def remove_owner_adapter(self, adapter_name: str) -> None:
        for key in list(self._callbacks):
            kept = [c for c in self._callbacks[key] if c.owner.adapter_name != adapter_name]
            if kept:
                self._callbacks[key] = kept
            else:
                del self._callbacks[key]

    def has_phase(self, phase: str, active: set[str]) -> bool:
        return any(p == phase and self._live(cbs, active) for (_, p), cbs in self._callbacks.items())

    @staticmethod
    def _live(callbacks: list[Callback], active: set[str]) -> list[Callable]:
        return [c.fn for c in callbacks if c.owner.adapter_name in active and not c.owner.merged]

    def refresh(self, active: set[str]) -> None:
        """Re-install hooks so that exactly the live callbacks run."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for host in self._prefix_hosts:
            if hasattr(host, PREFIX_ATTR):
                delattr(host, PREFIX_ATTR)
        self._prefix_hosts.clear()
        for (host_id, phase), callbacks in self._callbacks.items():
            fns = self._live(callbacks, active)
            if not fns:
                continue
            host = self._hosts[host_id]
            if phase == "pre":
                self._handles.append(host.register_forward_pre_hook(_pre_hook(fns), with_kwargs=True))
            elif phase == "post":
                self._handles.append(host.register_forward_hook(_post_hook(fns)))
            elif phase == "kwargs":
                self._handles.append(host.register_forward_pre_hook(_kwargs_hook(fns), with_kwargs=True))
            elif phase == "prefix":
                setattr(host, PREFIX_ATTR, fns)
                self._prefix_hosts.append(host)


def _pre_hook(fns: list[Callable]) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            x = args[0]
            for fn in fns:
                x = fn(x)
            return (x, *args[1:]), kwargs
        x = kwargs["hidden_states"]
        for fn in fns:
            x = fn(x)
        return args, {**kwargs, "hidden_states": x}

    return hook


def _post_hook(fns: list[Callable]) -> Callable:
    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        x = args[0] if args else None
        for fn in fns:
            output = fn(x, output)
        return output

    return hook


def _kwargs_hook(fns: list[Callable]) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        for fn in fns:
            args, kwargs = fn(args, kwargs)
        return args, kwargs

    return hook
