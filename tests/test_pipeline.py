"""The whole default pipeline on every zoo model: each pass keeps the outputs of the unoptimized
graph (relative L2 <= 1e-5, measured by the pass manager's numerics check after every pass), the IR
verifies after every pass, and the memory plan checks out."""

import pytest

import cnncompile
from cnncompile import zoo
from cnncompile.passes.memory import check_memory_plan

SIZES = {"lenet5": 32, "alexnet": 64, "vgg11": 32, "resnet18": 32, "resnet50": 32,
         "mobilenetv2": 32, "squeezenet": 64, "inception_block": 16, "densenet_block": 16,
         "unet": 32, "yolo_head": 64}


def test_every_zoo_model_is_covered():
    assert sorted(SIZES) == sorted(zoo.MODELS)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("name", sorted(SIZES))
def test_each_pass_preserves_outputs(name, layout):
    model = zoo.build(name, image_size=SIZES[name], seed=5)
    report = cnncompile.inspect(model, input_shapes=zoo.input_shapes(model), opt_level=2,
                                check_numerics=True, verify_each=True, layout=layout, seed=6)
    errors = {record.name: record.max_rel_error for record in report.passes}
    assert report.first_bad_pass is None, errors
    assert all(error <= 1e-5 for error in errors.values()), errors
    assert [r.name for r in report.passes][-1] == "plan_memory"
    plan = report.memory
    check_memory_plan(report.graph, plan)
    assert plan.arena_bytes <= 1.1 * plan.lower_bound_bytes
