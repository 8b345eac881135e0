"""The rewrite-pattern engine (passes/pattern.py): leaves, constants, commutative matching,
same-name captures, the single-use rule for interior nodes, and rules that decline."""

import numpy as np

from cnncompile.backends.reference import ReferenceExecutor
from cnncompile.ir.graph import Graph, Node
from cnncompile.ir.types import TensorType
from cnncompile.ir.verifier import verify
from cnncompile.ops import OPS
from cnncompile.passes.pattern import Pat, fused_origins, match, rewrite

F32 = np.dtype(np.float32)


class Net:
    """A tiny IR builder: every call adds one node and returns its output Value."""

    def __init__(self, *input_names, shape=(2, 3)):
        self.g = Graph("t")
        self.inputs = [self.g.add_input(n, TensorType(F32, shape)) for n in input_names]

    def const(self, name, data):
        return self.g.add_constant(name, np.asarray(data, dtype=F32))

    def __call__(self, op, *inputs, **attrs):
        out_type = OPS[op].infer(*[v.type for v in inputs], **attrs)
        name = self.g.unique_name(op.lower())
        node = Node(op, list(inputs), [self.g.new_value(name, out_type)], attrs, name=name)
        self.g.add_node(node)
        return node.outputs[0]

    def find(self, pat, node_index=-1):
        g = self.g
        return match(pat, g.nodes[node_index], g.users(), {id(v) for v in g.outputs})


def test_op_pattern_with_leaf_captures_node_and_value():
    net = Net("x")
    x, = net.inputs
    net("Relu", x)
    captures = net.find(Pat("Relu", Pat(name="v"), name="root"))
    assert captures["v"] is x and captures["root"] is net.g.nodes[0]
    assert net.find(Pat(("Sigmoid", "Relu"), Pat())) == {}
    assert net.find(Pat("Sigmoid", Pat())) is None


def test_input_count_must_match():
    net = Net("x", "y")
    x, y = net.inputs
    net("Sum", x, y, x)
    assert net.find(Pat("Sum", Pat(), Pat())) is None
    assert net.find(Pat("Sum", Pat(), Pat(), Pat())) == {}
    assert net.find(Pat("Sum")) == {}  # no input patterns: any arity


def test_constant_leaf_and_value_predicate():
    net = Net("x", "y")
    x, y = net.inputs
    half = net.const("half", 0.5)
    net("Mul", x, half)
    net("Mul", x, y)
    pat = Pat("Mul", Pat(name="a"), Pat.const(name="c"))
    assert net.find(pat, 0) == {"a": x, "c": half}
    assert net.find(pat, 1) is None  # y is a graph input, not a constant
    near_half = Pat("Mul", Pat(), Pat.const(where=lambda v: float(v.data) == 0.5))
    near_two = Pat("Mul", Pat(), Pat.const(where=lambda v: float(v.data) == 2.0))
    assert net.find(near_half, 0) is not None and net.find(near_two, 0) is None


def test_commutative_tries_both_orders():
    net = Net("x")
    x, = net.inputs
    c = net.const("c", [1.0, 2.0, 3.0])
    net("Add", c, x)
    fixed = Pat("Add", Pat(name="a"), Pat.const(name="c"))
    assert net.find(fixed) is None
    swapped = Pat("Add", Pat(name="a"), Pat.const(name="c"), commutative=True)
    assert net.find(swapped) == {"a": x, "c": c}


def test_same_name_must_be_the_same_value():
    net = Net("x", "y")
    x, y = net.inputs
    net("Mul", x, net("Sigmoid", x))          # node 1
    net("Mul", net("Sigmoid", x), x)          # node 3: the other operand order
    net("Mul", x, net("Sigmoid", y))          # node 5: not x * Sigmoid(x)
    silu = Pat("Mul", Pat(name="x"), Pat("Sigmoid", Pat(name="x")), commutative=True)
    assert net.find(silu, 1) == {"x": x}
    assert net.find(silu, 3) == {"x": x}
    assert net.find(silu, 5) is None
    ordered = Pat("Mul", Pat(name="x"), Pat("Sigmoid", Pat(name="x")))
    assert net.find(ordered, 3) is None


def test_interior_nodes_need_a_single_user_and_must_not_be_graph_outputs():
    pat = Pat("Relu", Pat("Neg", Pat(name="x")))
    net = Net("x")
    neg = net("Neg", net.inputs[0])
    net.g.outputs = [net("Relu", neg)]
    assert net.find(pat) == {"x": net.inputs[0]}
    shared = Net("x")
    neg = shared("Neg", shared.inputs[0])
    relu = shared("Relu", neg)
    shared.g.outputs = [relu, shared("Exp", neg)]   # Neg has two readers
    assert shared.find(pat, 1) is None
    exposed = Net("x")
    neg = exposed("Neg", exposed.inputs[0])
    exposed.g.outputs = [neg, exposed("Relu", neg)]  # Neg's one reader, but a graph output
    assert exposed.find(pat) is None


def _double_neg_net():
    net = Net("x")
    x, = net.inputs
    net.g.outputs = [net("Exp", net("Neg", net("Neg", x)))]
    return net


def test_rule_returning_none_changes_nothing():
    net = _double_neg_net()
    before = str(net.g)
    calls = []

    def decline(graph, x, outer):
        calls.append(outer.name)
        return None

    count = rewrite(net.g, [(Pat("Neg", Pat("Neg", Pat(name="x")), name="outer"), decline)],
                    created_by="test")
    assert count == 0 and calls and str(net.g) == before


def test_rewrite_splices_replacement_and_removes_dead_interior():
    net = _double_neg_net()
    root_out = net.g.nodes[1].outputs[0]
    names = tuple(n.name for n in net.g.nodes[:2])

    def cancel(graph, x, outer, inner):
        return Node("Identity", [x], [outer.outputs[0]], name=outer.name,
                    origins=fused_origins(inner, outer))

    pat = Pat("Neg", Pat("Neg", Pat(name="x"), name="inner"), name="outer")
    assert rewrite(net.g, [(pat, cancel)], created_by="test") == 1
    verify(net.g)
    assert net.g.op_counts() == {"Exp": 1, "Identity": 1}
    ident = net.g.nodes[0]
    assert ident.outputs[0] is root_out and root_out.producer is ident  # the name survives
    assert ident.created_by == "test" and ident.origins == names
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    np.testing.assert_allclose(ReferenceExecutor(net.g).run([x])[0], np.exp(x), rtol=1e-6)


def test_rewrite_repeats_until_no_rule_matches():
    net = Net("x")
    y = net.inputs[0]
    for _ in range(5):
        y = net("Relu", y)
    net.g.outputs = [y]

    def collapse(graph, x, root):
        return Node("Relu", [x], [root.outputs[0]], name=root.name)

    count = rewrite(net.g, [(Pat("Relu", Pat("Relu", Pat(name="x")), name="root"), collapse)],
                    created_by="test")
    verify(net.g)
    assert count == 4 and net.g.op_counts() == {"Relu": 1}
    assert net.g.outputs[0] is y
