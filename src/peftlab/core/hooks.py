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


@dataclass
class Callback:
    owner: Any  # a PeftModule; it has .adapter_name and .merged
    fn: Callable


class HookRegistry:
    """Callbacks per (host, phase); phases: ``pre`` (x -> x), ``post`` ((x, y) -> y), ``kwargs``
    ((args, kwargs) -> (args, kwargs)), and ``attr:<name>``: no hook, the live callbacks are set as the host's
    attribute ``<name>`` for code the host calls to read (e.g. prefix key/values read by an attention function)."""

    def __init__(self) -> None:
        self._callbacks: dict[tuple[int, str], list[Callback]] = {}
        self._hosts: dict[int, nn.Module] = {}
        self._handles: list[Any] = []
        self._attributes: list[tuple[nn.Module, str]] = []

    def add(self, host: nn.Module, phase: str, owner: Any, fn: Callable) -> None:
        self._hosts[id(host)] = host
        self._callbacks.setdefault((id(host), phase), []).append(Callback(owner, fn))

    def add_attribute(self, host: nn.Module, name: str, owner: Any, fn: Callable) -> None:
        """Set ``host.<name>`` to the list of live callbacks registered under that name."""
        self.add(host, f"attr:{name}", owner, fn)

    def hosts(self, adapter_name: str, backward: bool = False) -> list[nn.Module]:
        """The host modules the adapter's callbacks sit on, live or not (merged modules changed their host's
        weights): where in the backbone the adapter acts. Owners that only observe (``observer = True``: a
        sequence view reading the padding mask) change nothing there and are left out. ``backward``: only the hosts
        a training step back-propagates through, leaving out owners that read the backbone detached
        (``detached = True``: LST's side network)."""

        def counts(owner: Any) -> bool:
            if owner.adapter_name != adapter_name or getattr(owner, "observer", False):
                return False
            return not (backward and getattr(owner, "detached", False))

        return [
            self._hosts[host_id]
            for (host_id, _), callbacks in self._callbacks.items()
            if any(counts(c.owner) for c in callbacks)
        ]

    def remove_owner_adapter(self, adapter_name: str) -> None:
        for key in list(self._callbacks):
            kept = [c for c in self._callbacks[key] if c.owner.adapter_name != adapter_name]
            if kept:
                self._callbacks[key] = kept
            else:
                del self._callbacks[key]

    @staticmethod
    def _live(callbacks: list[Callback], active: set[str]) -> list[Callable]:
        return [c.fn for c in callbacks if c.owner.adapter_name in active and not c.owner.merged]

    def refresh(self, active: set[str]) -> None:
        """Re-install hooks so that exactly the live callbacks run."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for host, name in self._attributes:
            if hasattr(host, name):
                delattr(host, name)
        self._attributes.clear()
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
            elif phase.startswith("attr:"):
                name = phase.removeprefix("attr:")
                setattr(host, name, fns)
                self._attributes.append((host, name))


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
