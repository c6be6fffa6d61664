"""Exit-point discovery and stage splitting with torch.fx.

A node of the traced graph is a valid exit point when the backbone's output is
a function of that node's output alone: no activation computed before the node
(and no input) is read by anything after it. This is paper 003's section 3.1
criterion ("no layer in parallel"), generalised from layers to arbitrary graph
nodes. Parameters and constants (``get_attr`` nodes) may cross a cut: they are
copied into the later stage.

Granularity: by default candidates are the outputs of first-level modules
(``layer1``, ``layer2`` ...), descending a level while that gives fewer than 4
points (``granularity="auto"``); ``granularity=1`` pins the first level,
``granularity=2`` descends one level (``layer1.0``, ``layer1.1`` ... the residual blocks), and ``"node"`` takes
every valid node. Candidates too close to the output (less than
``min_remaining`` of the backbone's FLOPs left after them) are dropped, and of a
chain of candidates with no FLOPs between them (conv -> bn -> relu) only the last
is kept.

Models that torch.fx cannot trace: a submodule whose ``forward`` fails to trace
(data-dependent control flow, say) is retried as an opaque leaf, so the rest of
the graph still yields exit points; when the top-level ``forward`` itself fails,
torch.export (non-strict, dynamic batch) is tried, which captures shape-dependent
branches and other Python that symbolic tracing cannot; when both fail,
``TraceError`` names the construct and the line, and points the user to the
fallbacks (``leaf_modules=[...]`` or restructuring).
"""

from __future__ import annotations

import copy
import hashlib
import linecache
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .cost import count_flops
from .errors import DataError, TraceError

__all__ = ["ExitPoint", "TracedBackbone", "trace_backbone", "find_exit_points", "backbone_hash"]


@dataclass(frozen=True)
class ExitPoint:
    """A place in the backbone where an exit head can be attached.

    ``name`` is a module path (``layer2.1``) or, at node granularity, an fx node
    name; ``node`` is the fx node whose output the head reads; ``shape`` excludes
    the batch dimension; FLOPs are per sample.
    """

    name: str
    node: str
    shape: tuple[int, ...]
    flops_before: int
    flops_after: int

    @property
    def depth_fraction(self) -> float:
        total = self.flops_before + self.flops_after
        return self.flops_before / total if total else 0.0

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "node": self.node,
            "shape": list(self.shape),
            "flops_before": self.flops_before,
            "flops_after": self.flops_after,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ExitPoint:
        return cls(d["name"], d["node"], tuple(d["shape"]), int(d["flops_before"]), int(d["flops_after"]))


def backbone_hash(model: nn.Module) -> str:
    """SHA-256 of the model's class, structure and every parameter/buffer value."""
    h = hashlib.sha256()
    h.update(type(model).__qualname__.encode())
    h.update(repr(model).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        t = t.detach().cpu().contiguous()
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        if t.numel():
            if t.dtype == torch.bfloat16:
                t = t.float()
            h.update(t.numpy().tobytes())
    return h.hexdigest()


class _AutoLeafTracer(fx.Tracer):
    """fx tracer that records which submodule was being traced when tracing failed."""

    def __init__(self, leaves: Iterable[str]):
        super().__init__()
        self.leaves = set(leaves)
        self.failing: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaves:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        qualname = self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failing is None:  # innermost module sees the exception first
                self.failing = qualname
            raise


def _user_frame(exc: BaseException) -> str:
    """``file:line: code`` of the innermost frame outside torch, for error messages."""
    frames = traceback.extract_tb(exc.__traceback__)
    for fr in reversed(frames):
        fn = fr.filename.replace("\\", "/")
        if "/torch/" in fn or "/autoexit/points.py" in fn:
            continue
        code = (fr.line or linecache.getline(fr.filename, fr.lineno)).strip()
        return f"{fr.filename}:{fr.lineno}: `{code}`"
    return "unknown location"


def _export_graph(model: nn.Module, example: torch.Tensor) -> fx.GraphModule | None:
    """torch.export (non-strict) as the fallback when fx cannot trace the top-level forward.

    It handles shape-dependent branches, asserts and other Python that symbolic
    tracing cannot, and keeps module names. The graph is accepted only if it runs
    any batch size and matches the model.
    """
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            x2 = torch.cat([example[:1]] * 2)
            ep = torch.export.export(model, (x2,), dynamic_shapes=({0: torch.export.Dim.AUTO},), strict=False)
            gm = ep.module()
            x3 = torch.cat([example[:1]] * 3)
            with torch.no_grad():
                ok = torch.allclose(gm(x3), model(x3), atol=1e-5)
        return gm if ok else None
    except Exception:  # noqa: BLE001 - the fx error is the one reported
        return None


def _trace(model: nn.Module, leaf_modules: Sequence[str] = (),
           example: torch.Tensor | None = None) -> tuple[fx.GraphModule, list[str]]:
    leaves = list(leaf_modules)
    known = dict(model.named_modules())
    for name in leaves:
        if name not in known:
            raise TraceError(
                f"leaf_modules names '{name}', which is not a submodule of {type(model).__name__}; "
                f"use a path from model.named_modules(), e.g. {next(iter(k for k in known if k), '')!r}"
            )
    auto: list[str] = []
    for _ in range(64):
        tracer = _AutoLeafTracer(leaves)
        try:
            graph = tracer.trace(model)
        except Exception as exc:  # noqa: BLE001 - any tracing failure is reported or retried
            if tracer.failing and tracer.failing not in leaves:
                leaves.append(tracer.failing)
                auto.append(tracer.failing)
                continue
            if example is not None:
                gm = _export_graph(model, example)
                if gm is not None:  # a plain GraphModule around the exported graph (exported ones refuse .eval())
                    return fx.GraphModule(gm, copy.deepcopy(gm.graph), type(model).__name__), auto
            what = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise TraceError(
                f"cannot trace {type(model).__name__}.forward with torch.fx: {what} at {_user_frame(exc)}; "
                "torch.export could not capture it either; fix: move that code into a submodule (autoexit then "
                "treats it as one opaque block) or pass leaf_modules=['path.to.module'] naming the modules to keep opaque"
            ) from exc
        name = type(model).__name__
        gm = fx.GraphModule(tracer.root, graph, name)
        return gm, auto
    raise TraceError(f"cannot trace {type(model).__name__}: more than 64 submodules fail to trace")


def _set_eval(m: nn.Module) -> None:
    try:
        m.eval()
    except NotImplementedError:  # torch.export modules refuse .eval(); they are exported in eval mode
        pass


class TracedBackbone:
    """A backbone traced with torch.fx, with shapes and per-node order, that can be cut into stages."""

    def __init__(
        self,
        model: nn.Module,
        example_input: torch.Tensor,
        leaf_modules: Sequence[str] = (),
    ):
        if not isinstance(model, nn.Module):
            raise TraceError(f"the backbone must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(example_input, torch.Tensor):
            raise DataError(f"example_input must be a tensor, got {type(example_input).__name__}")
        _set_eval(model)
        self.model = model
        if isinstance(model, fx.GraphModule) and not leaf_modules:
            # already a graph (torch.export's .module(), a converted TorchScript model, a user's fx graph)
            self.gm, self.auto_leaves = fx.GraphModule(model, copy.deepcopy(model.graph), type(model).__name__), []
        else:
            self.gm, self.auto_leaves = _trace(model, leaf_modules, example_input)
        _set_eval(self.gm)
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        if not placeholders:
            raise TraceError(f"{type(model).__name__}.forward takes no input; it cannot be early-exited")
        extra = [n for n in placeholders[1:] if not n.args]
        if extra:
            raise TraceError(
                f"{type(model).__name__}.forward takes {len(placeholders)} inputs "
                f"({', '.join(n.name for n in placeholders)}); autoexit needs one input tensor: "
                "wrap the model in a module whose forward(x) supplies the others"
            )
        example = example_input[:1] if example_input.dim() > 0 and example_input.shape[0] > 1 else example_input
        self.example_input = example.detach().clone()
        try:
            with torch.no_grad():
                ShapeProp(self.gm).propagate(self.example_input)
        except Exception as exc:  # noqa: BLE001
            raise DataError(
                f"the backbone fails on an input of shape {tuple(self.example_input.shape)}: "
                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
                "pass data (or example_input) with the shape the model expects, batch first"
            ) from exc
        self.nodes = list(self.gm.graph.nodes)
        self.index = {n.name: i for i, n in enumerate(self.nodes)}
        out = self.nodes[-1]
        result = out.args[0]
        if isinstance(result, (tuple, list)) and len(result) == 1:  # exported graphs return a 1-tuple
            result = result[0]
        self.result = result
        if not isinstance(result, fx.Node) or not isinstance(result.meta.get("tensor_meta"), object) \
                or not hasattr(result.meta.get("tensor_meta"), "shape"):
            raise TraceError(
                f"{type(model).__name__}.forward must return one logits tensor [batch, classes]; "
                "wrap it so that forward returns only the class scores"
            )
        oshape = tuple(result.meta["tensor_meta"].shape)
        if len(oshape) != 2:
            raise TraceError(
                f"{type(model).__name__} returns shape {oshape}; autoexit needs classifier logits "
                "[batch, classes]"
            )
        self.num_classes = int(oshape[1])
        self.hash = backbone_hash(model)
        self._valid = self._valid_cuts()
        self._total_flops: int | None = None

    # ------------------------------------------------------------------ graph analysis
    def _valid_cuts(self) -> list[str]:
        """Names of nodes after which the graph can be cut (single live activation)."""
        last_use = {}
        for i, n in enumerate(self.nodes):
            last_use[n.name] = max((self.index[u.name] for u in n.users), default=i)
        valid = []
        frontier = -1  # max last-use index over activations defined strictly before node i
        for i, n in enumerate(self.nodes):
            ok = (
                n.op not in ("placeholder", "output", "get_attr")
                and frontier <= i
                and self._is_batched_tensor(n)
                and any(u.op != "output" for u in n.users)
            )
            if ok:
                valid.append(n.name)
            if n.op != "get_attr":
                frontier = max(frontier, last_use[n.name])
        return valid

    def _is_batched_tensor(self, n: fx.Node) -> bool:
        tm = n.meta.get("tensor_meta")
        if tm is None or not hasattr(tm, "shape"):
            return False
        shape = tuple(tm.shape)
        return len(shape) >= 2 and shape[0] == self.example_input.shape[0]

    def node_shape(self, node: str) -> tuple[int, ...]:
        return tuple(self.nodes[self.index[node]].meta["tensor_meta"].shape[1:])

    def _owner(self, n: fx.Node) -> str:
        if n.op == "call_module":
            return str(n.target)
        stack = n.meta.get("nn_module_stack") or {}
        if stack:
            path = list(stack.values())[-1]
            return path[0] if isinstance(path, tuple) else str(path)
        return ""

    def module_outputs(self, granularity: int) -> list[tuple[str, str]]:
        """(module path at the given depth, node name of its last output), in graph order."""
        groups: list[tuple[str, str]] = []
        seen: dict[str, int] = {}
        for n in self.nodes:
            if n.op in ("placeholder", "output", "get_attr"):
                continue
            owner = self._owner(n)
            key = ".".join(owner.split(".")[:granularity]) if owner else n.name
            if groups and groups[-1][0] == key:
                groups[-1] = (key, n.name)
            else:
                groups.append((key, n.name))
        named = []
        for key, node in groups:
            seen[key] = seen.get(key, 0) + 1
            named.append((key if seen[key] == 1 else f"{key}@{seen[key] - 1}", node))
        return named

    # ------------------------------------------------------------------ FLOPs per cut
    @property
    def total_flops(self) -> int:
        if self._total_flops is None:
            self._total_flops = count_flops(self.gm, self.example_input)
        return self._total_flops

    def _flops_prefix(self, nodes: Sequence[str]) -> list[int]:
        """FLOPs from the input up to each of the given cut nodes (ordered)."""
        stages = self.split(nodes)
        out, acc, x = [], 0, self.example_input
        with torch.no_grad():
            for st in stages[:-1]:
                acc += count_flops(st, x)
                x = st(x)
                out.append(acc)
        return out

    # ------------------------------------------------------------------ public API
    def candidates(
        self,
        granularity: int | str = "auto",
        min_remaining: float = 0.05,
        include: Sequence[str] | None = None,
        min_points: int = 4,
    ) -> list[ExitPoint]:
        """Exit points of this backbone.

        ``granularity="auto"`` (the default) takes first-level module outputs and
        descends one module level at a time while that yields fewer than
        ``min_points`` points (a model whose first level is one ``features``
        container gets its blocks instead).

        ``include`` selects points by name (module path or node name) instead of
        discovering them; each must be a valid cut, else a one-line error lists the
        valid ones.
        """
        valid = set(self._valid)
        if include is not None:
            lookup: dict[str, str] = {}
            for depth in range(1, 8):
                for name, node in self.module_outputs(depth):
                    lookup.setdefault(name, node)
            for node in self._valid:
                lookup.setdefault(node, node)
            chosen = []
            for name in include:
                node = lookup.get(name)
                if node is None:
                    raise TraceError(
                        f"exit point '{name}' is neither a module path nor a node of the traced backbone; "
                        f"valid points include: {', '.join(self._suggest())}"
                    )
                if node not in valid:
                    raise TraceError(
                        f"'{name}' cannot be an exit point: activations from before it are used after it "
                        f"(a skip connection crosses it); valid points include: {', '.join(self._suggest())}"
                    )
                chosen.append((name, node))
            chosen.sort(key=lambda t: self.index[t[1]])
            return self._with_flops(chosen, min_remaining=None)
        if granularity == "auto":
            best: list[ExitPoint] = []
            for depth in range(1, 7):
                pts = self.candidates(depth, min_remaining=min_remaining)
                if len(pts) > len(best):
                    best = pts
                if len(pts) >= min_points:
                    return pts
            return best
        if granularity == "node":
            pairs = [(n, n) for n in self._valid]
        else:
            try:
                depth = int(granularity)
            except (TypeError, ValueError):
                raise TraceError(
                    f"granularity must be a module depth (1, 2, ...) or 'node', got {granularity!r}"
                ) from None
            if depth < 1:
                raise TraceError(f"granularity must be >= 1 or 'node', got {depth}")
            pairs = [(name, node) for name, node in self.module_outputs(depth) if node in valid]
        return self._with_flops(pairs, min_remaining=min_remaining)

    def _suggest(self) -> list[str]:
        names = [name for name, node in self.module_outputs(1) if node in set(self._valid)]
        return names[:8] or self._valid[:8]

    def _with_flops(self, pairs: list[tuple[str, str]], min_remaining: float | None) -> list[ExitPoint]:
        if not pairs:
            return []
        total = self.total_flops
        before = self._flops_prefix([node for _, node in pairs])
        points = []
        for (name, node), fb in zip(pairs, before):
            points.append(ExitPoint(name, node, self.node_shape(node), int(fb), int(total - fb)))
        if min_remaining is None:
            return points
        # drop points too close to the output
        points = [p for p in points if total == 0 or p.flops_after >= min_remaining * total]
        # of chains with no FLOPs between consecutive points keep the last; drop points before any FLOPs
        kept: list[ExitPoint] = []
        for p in points:
            if p.flops_before == 0:
                continue
            if kept and kept[-1].flops_before == p.flops_before:
                kept[-1] = p
            else:
                kept.append(p)
        return kept

    def split(self, cut_nodes: Sequence[str]) -> list[fx.GraphModule]:
        """Cut the graph after each node in ``cut_nodes``: ``len(cut_nodes) + 1`` stages.

        Stage k maps the activation at cut k-1 (the model input for k = 0) to the
        activation at cut k (the model output for the last stage).
        """
        for c in cut_nodes:
            if c not in self.index:
                raise TraceError(f"unknown node '{c}'")
            if c not in set(self._valid):
                raise TraceError(f"cannot cut after node '{c}': a skip connection crosses it")
        cuts = sorted(set(cut_nodes), key=lambda c: self.index[c])
        bounds = [-1] + [self.index[c] for c in cuts] + [len(self.nodes) - 1]
        stages = []
        for k in range(len(bounds) - 1):
            lo, hi = bounds[k], bounds[k + 1]
            g = fx.Graph()
            env: dict[fx.Node, fx.Node] = {}
            if k == 0:
                for n in self.nodes:
                    if n.op == "placeholder":
                        env[n] = g.node_copy(n, lambda a, env=env: env[a])
                        # string annotations (from __future__ import annotations) break TorchScript
                        env[n].type = None
            else:
                src = self.nodes[lo]
                ph = g.placeholder("x")
                ph.meta = copy.copy(src.meta)
                env[src] = ph

            def lookup(a: fx.Node, env=env, g=g) -> fx.Node:
                if a not in env:
                    if a.op == "get_attr":  # parameters/constants may cross cuts
                        env[a] = g.node_copy(a, lambda b: env[b])
                    else:  # pragma: no cover - guarded by _valid_cuts
                        raise TraceError(f"node '{a.name}' crosses the cut")
                return env[a]

            for i in range(lo + 1, hi + 1):
                n = self.nodes[i]
                if n.op in ("placeholder",):
                    continue
                if n.op == "output":
                    g.output(lookup(self.result))
                    continue
                if n.op == "get_attr":
                    if n not in env:
                        env[n] = g.node_copy(n, lookup)
                    continue
                env[n] = g.node_copy(n, lookup)
            if k < len(bounds) - 2:
                g.output(env[self.nodes[hi]])
            gm = fx.GraphModule(self.gm, g, f"Stage{k}")
            _set_eval(gm)
            stages.append(gm)
        return stages

    def capture_module(self, cut_nodes: Sequence[str]) -> fx.GraphModule:
        """A module returning ``(activation at each cut..., logits)`` in one forward pass."""
        g = copy.deepcopy(self.gm.graph)
        g._codegen = fx.graph.CodeGen()  # plain tuple output, whatever the source graph's pytree spec was
        names = {n.name: n for n in g.nodes}
        out = next(n for n in g.nodes if n.op == "output")
        g.erase_node(out)
        g.output(tuple(names[c] for c in cut_nodes) + (names[self.result.name],))
        gm = fx.GraphModule(self.gm, g, "Capture")
        _set_eval(gm)
        return gm


def trace_backbone(
    model: nn.Module, example_input: torch.Tensor, leaf_modules: Sequence[str] = ()
) -> TracedBackbone:
    """Trace ``model`` with torch.fx (see the module docstring for the untraceable-model fallback)."""
    return TracedBackbone(model, example_input, leaf_modules)


def find_exit_points(
    model: nn.Module | TracedBackbone,
    example_input: torch.Tensor | None = None,
    granularity: int | str = "auto",
    min_remaining: float = 0.05,
    include: Sequence[str] | None = None,
) -> list[ExitPoint]:
    """Candidate exit points of ``model`` (see :class:`TracedBackbone.candidates`)."""
    if not isinstance(model, TracedBackbone):
        if example_input is None:
            raise DataError("find_exit_points needs example_input (one input batch) for an nn.Module")
        model = TracedBackbone(model, example_input)
    return model.candidates(granularity=granularity, min_remaining=min_remaining, include=include)
