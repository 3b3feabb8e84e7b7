"""python -m dpbp.export: a trained network as an ONNX graph that takes raw features.

    python -m dpbp.export runs/demo --onnx model.onnx              # the run's final.npz
    python -m dpbp.export runs/demo/best.npz --onnx best.onnx      # or any parameters file or checkpoint

The graph is what ``dpbp.load(...).predict`` computes, operator for operator (needs ``pip install
-e ".[onnx]"``):

    input  x        (n, features)  the model's dtype (float64 unless model.dtype = "float32")
    Sub, Div        (x - mean) / std, when the run has data.standardize (the statistics it saved)
    Gemm            net = h W^T + b, one per layer (transB = 1: W is stored out × in, as dpbp holds it)
    activation      Sigmoid, Tanh, Relu, Identity (hidden: model.activation; last: model.output) or
                    Softmax over axis 1 (the output's units, row by row, as layers.softmax)
    output y        (n, outputs)
    output predicted (n,) int64: argmax over the outputs, for a softmax or sigmoid output with 2+ units;
                    the class names (data.classes) are in the model's metadata "classes" (JSON)

An activation with no ONNX operator in ONNX_OPS is refused with a message naming it. The file is written
atomically (temporary file, rename) by rank 0.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from dpbp import __version__
from dpbp.api import load
from dpbp.checkpoint import atomic_write
from dpbp.cli import ArgumentParser, parse_args, run, say
from dpbp.errors import UserError

OPSET = 17  # Softmax's axis semantics (one row's units) are those of opset 13 and later
# dpbp's activation (dpbp/layers.py ACTIVATIONS) -> (ONNX operator, its attributes)
ONNX_OPS = {"sigmoid": ("Sigmoid", {}), "tanh": ("Tanh", {}), "relu": ("Relu", {}), "identity": ("Identity", {}),
            "softmax": ("Softmax", {"axis": 1})}


def onnx_op(activation):
    """(operator, attributes) for a dpbp activation; UserError for one without an ONNX equivalent here."""
    if activation not in ONNX_OPS:
        raise UserError(f"activation {activation!r} has no ONNX operator in dpbp.export (mapped: "
                        f"{', '.join(sorted(ONNX_OPS))})")
    return ONNX_OPS[activation]


def build_graph(model, dtype=None):
    """The onnx.ModelProto of a dpbp.api.Model (see the module doc); dtype: float32/float64, default the
    model's own."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    net = model.network
    dtype = np.dtype(dtype or net.dtype)
    elem = TensorProto.DOUBLE if dtype == np.float64 else TensorProto.FLOAT
    consts, nodes = [], []

    def const(name, value):
        consts.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    h = "x"
    if model.standardize is not None:
        nodes.append(helper.make_node("Sub", [h, const("standardize.mean", model.standardize.mean)], ["centered"]))
        nodes.append(helper.make_node("Div", ["centered", const("standardize.std", model.standardize.std)],
                                      ["standardized"]))
        h = "standardized"
    activations = [net.activation] * (net.n_layers - 1) + [net.output]
    for k, activation in enumerate(activations):
        op, attrs = onnx_op(activation)
        w, b = const(f"layers.{k}.weight", net.weights[k]), const(f"layers.{k}.bias", net.biases[k])
        nodes.append(helper.make_node("Gemm", [h, w, b], [f"net{k}"], transB=1))
        h = "y" if k == net.n_layers - 1 else f"out{k}"
        nodes.append(helper.make_node(op, [f"net{k}"], [h], **attrs))
    outputs = [helper.make_tensor_value_info("y", elem, ["n", net.sizes[-1]])]
    if net.output in ("softmax", "sigmoid") and net.sizes[-1] >= 2:
        nodes.append(helper.make_node("ArgMax", ["y"], ["predicted"], axis=1, keepdims=0))
        outputs.append(helper.make_tensor_value_info("predicted", TensorProto.INT64, ["n"]))
    graph = helper.make_graph(nodes, "dpbp", [helper.make_tensor_value_info("x", elem, ["n", net.sizes[0]])],
                              outputs, consts)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="dpbp",
                              producer_version=__version__)
    proto.ir_version = min(proto.ir_version, 8)  # readable by onnxruntime releases of the last years
    helper.set_model_props(proto, {"classes": json.dumps(model.classes or []),
                                   "sizes": json.dumps(net.sizes)})
    onnx.checker.check_model(proto)
    return proto


def build_parser():
    p = ArgumentParser(prog="python -m dpbp.export",
                       description="Write a trained network (standardization included) as an ONNX graph.")
    p.add_argument("source", metavar="RUN_OR_PARAMS",
                   help="a run directory (its final.npz) or a parameters file (final.npz, best.npz, a checkpoint)")
    p.add_argument("--onnx", required=True, metavar="FILE.onnx", help="the ONNX file to write")
    p.add_argument("--dtype", choices=("float32", "float64"), help="the graph's float type (default: the model's)")
    return p


def source_problem(source, out):
    """Why `source` cannot be exported to `out`, or None."""
    if not os.path.exists(source):
        return f"{source!r}: no such run directory or parameters file"
    if os.path.isdir(source) and not os.path.exists(os.path.join(source, "final.npz")):
        return f"{source!r} is not a finished dpbp run (no final.npz in it); name its parameters file instead"
    if os.path.isdir(out):
        return f"--onnx {out!r} is a directory; name the file to write, e.g. {os.path.join(out, 'model.onnx')}"
    params = os.path.join(source, "final.npz") if os.path.isdir(source) else source
    if os.path.exists(out) and os.path.samefile(out, params):
        return f"--onnx {out!r} is the parameters file itself; choose another file"
    return None


def main(argv, comm):
    args = parse_args(build_parser(), argv, comm)
    problem = source_problem(args.source, args.onnx)
    if problem:
        raise UserError(problem)
    try:
        import onnx  # noqa: F401  (only to say what is missing before any work)
    except ImportError:
        raise UserError('dpbp.export needs the onnx package: pip install -e ".[onnx]"') from None
    model = load(args.source)
    data = build_graph(model, args.dtype).SerializeToString()
    error = None
    if comm.rank == 0:
        try:
            atomic_write(args.onnx, lambda f: f.write(data))
        except OSError as e:
            error = f"--onnx {args.onnx!r}: cannot write there ({e.strerror or e})"
    comm.agree(error)
    net = model.network
    say(comm, f"wrote {args.onnx}: {'-'.join(map(str, net.sizes))} {net.activation}/{net.output}"
              f"{', standardization included' if model.standardize is not None else ''}, input x (n, {net.sizes[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(run(main, prog="dpbp.export"))
