"""The kernel-time profile's classification (bench/profile_kernels.py), on kernel names and launching
ops as an H200 profile showed them, and one CPU profile end to end."""
import json

import pytest

import profile_kernels as P

# (kernel, launching op chain innermost first, expected kind): names copied from the H200 profile.
CASES = [
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize256x64x32",
     ["aten::cudnn_convolution", "aten::_convolution", "aten::convolution", "aten::conv2d"], "convolutions"),
    ("nvjet_sm90_tst_192x192_64x4_2x1_v_ssched_bz_coopB_TNN",
     ["aten::cudnn_convolution", "aten::_convolution", "aten::convolution", "aten::conv2d"], "convolutions"),
    ("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::CUDAFunctor_add",
     ["aten::add_", "aten::_convolution", "aten::convolution", "aten::conv2d"], "conv bias pass"),
    ("void at::native::vectorized_elementwise_kernel<8, at::native::CUDAFunctor_add<c10::BFloat16>",
     ["aten::add"], "other elementwise"),
    ("Memset (Device)", ["aten::cudnn_convolution", "aten::convolution"], "memcpy/memset"),
    ("void at::native::bfloat16_copy_kernel_cuda",
     ["aten::copy_", "aten::_to_copy", "aten::to", "aten::conv2d"], "dtype casts"),
    ("void at::native::(anonymous namespace)::avg_pool2d_out_cuda_frame_nhwc<c10::BFloat16, float>",
     ["aten::avg_pool2d"], "pooling"),
    ("silu_kernel", ["aten::silu"], "SiLU"),
    ("void cudnn::cnn::conv2d_grouped_direct_kernel", ["aten::cudnn_convolution", "aten::convolution",
                                                       "aten::conv1d"], "ECA"),
    ("reduce_kernel<128, 4, at::native::ReduceOp<c10::BFloat16, at::native::MeanOps", ["aten::mean"], "ECA"),
    ("batch_norm_collect_statistics_kernel", ["aten::native_batch_norm", "aten::batch_norm"],
     "weight standardisation"),
    ("_apply_nhwc_kernel", ["nfnet_fast::triton_eca_residual"], "ECA"),
    ("apply_kernel", ["nfnet_fast::eca_residual"], "ECA"),
    ("_silu_scale_fwd_kernel", ["nfnet_fast::triton_silu_scale"], "SiLU"),
    ("_std_fwd_kernel", ["nfnet_fast::triton_scaled_std_weight"], "weight standardisation"),
    ("triton_poi_fused_add_mul_silu_0", [], "inductor kernels"),
    ("triton_tem_fused_convolution_1", [], "convolutions"),
    ("nvjet_sm90_tst_64x512", ["aten::addmm", "aten::linear"], "classifier (linear)"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::TensorListMetadata<2>",
     ["aten::_foreach_add_", "Optimizer.step#SGD.step", "optimizer"], "AGC + optimizer"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::NormOps<float",
     ["aten::linalg_vector_norm", "aten::norm", "agc"], "AGC + optimizer"),
]

# (launching op chain innermost first, phase): on a GPU the backward's ops run on autograd's device
# thread, outside train_step's "backward" range; on a CPU inside it.
PHASE_CASES = [
    (["aten::cudnn_convolution", "aten::convolution", "aten::conv2d", "forward"], "forward"),
    (["aten::convolution_backward", "autograd::engine::evaluate_function: ConvolutionBackward0"], "backward"),
    (["nfnet_fast::fused_conv_backward", "FusedConvBackward"], "backward"),
    (["aten::silu_backward", "backward"], "backward"),
    (["aten::_foreach_mul_", "agc"], "AGC + optimizer"),
    (["aten::_foreach_add_", "Optimizer.step#SGD.step"], "AGC + optimizer"),
    ([], "unattributed"),  # (a kernel no op launched: inductor's, launched from Python)
]


@pytest.mark.parametrize("kernel, chain, kind", CASES, ids=[c[2] + "-" + str(i) for i, c in enumerate(CASES)])
def test_classify(kernel, chain, kind):
    assert P.classify(kernel, chain) == kind
    assert kind in P.KINDS


@pytest.mark.parametrize("chain, phase", PHASE_CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(PHASE_CASES)])
def test_phase(chain, phase):
    assert P.phase(chain) == phase and phase in P.PHASES + ("unattributed",)


def test_every_kind_is_reachable():
    assert {c[2] for c in CASES} | {"layout copies", "nfnet_fast kernels", "other"} == set(P.KINDS)


def test_cpu_profile_writes_its_tables(tmp_path):
    """End to end on the CPU (op self-time instead of kernels), and --only-compiled refuses where no
    compiled contender exists instead of writing an empty column."""
    assert P.main(["--out", str(tmp_path), "--batch", "1", "--size", "32", "--no-compile"]) == 0
    data = json.loads((tmp_path / "kernel_kinds.json").read_text())
    assert "timm eager fp32" in data["kinds"] and sum(data["kinds"]["timm eager fp32"].values()) > 0
    assert "convolutions" in (tmp_path / "kernel_kinds.md").read_text()
    with pytest.raises(SystemExit):
        P.main(["--out", str(tmp_path), "--batch", "1", "--size", "32", "--only-compiled"])


def test_cpu_training_profile_splits_the_step_into_phases(tmp_path):
    """--train end to end on the CPU: every contender's step has op time in each phase (the backward's
    ops found under train_step's range, AGC's and the optimizer's under theirs), no op unattributed,
    and it writes its own files beside the forward's, without the reference backend."""
    assert P.main(["--out", str(tmp_path), "--train", "--batch", "2", "--size", "32"]) == 0
    data = json.loads((tmp_path / "kernel_kinds_train.json").read_text())
    assert "timm eager fp32" in data["kinds"] and not (tmp_path / "kernel_kinds.json").exists()
    assert any(n.startswith("nfnet_fast") for n in data["kinds"]) and "nfnet_fast reference fp32" not in data["kinds"]
    for name, phases in data["phases"].items():
        assert all(phases.get(ph, 0) > 0 for ph in P.PHASES) and not phases.get("unattributed"), (name, phases)
        assert phases["wall"] > 0
    assert "wall time of a step" in (tmp_path / "kernel_kinds_train.md").read_text()
    with pytest.raises(SystemExit):
        P.main(["--out", str(tmp_path), "--train", "--only-compiled"])


@pytest.mark.parametrize("kernel, kind", [
    ("_conv1x1_kernel", "nfnet_fast kernels"), ("_conv_kernel", "nfnet_fast kernels"),
    ("_std_bwd_kernel", "weight standardisation"), ("_silu_scale_bwd_kernel", "SiLU"), ("_dy_nhwc_kernel", "ECA")])
def test_own_kernels_without_their_op_classified_by_name(kernel, kind):
    """The H100's training profile linked some of nfnet_fast's Triton kernels to no op: by name, then."""
    assert P.classify(kernel, []) == kind


def test_gpu_annotations_are_not_counted_as_kernels():
    """On a GPU the profiler also lists each record_function range (the step's phases, the ops' ranges)
    as a device event spanning its kernels: counting it again gave a 93 ms step 136 ms of kernels."""
    from types import SimpleNamespace as NS

    from torch.autograd import DeviceType

    def event(name, device, start, end, annotation=False, kernels=(), parent=None):
        return NS(name=name, device_type=device, time_range=NS(start=start, end=end), is_user_annotation=annotation,
                  kernels=list(kernels), cpu_parent=parent)
    op = event("aten::add", DeviceType.CPU, 0, 5, kernels=[NS(name="add_kernel", duration=3.0)])
    annotation = event("forward", DeviceType.CUDA, 9, 30, annotation=True)
    events = [op, event("add_kernel", DeviceType.CUDA, 10, 13), annotation,
              event("_conv1x1_kernel", DeviceType.CUDA, 14, 21)]
    got = sorted((name, chain, us) for name, chain, us in P.kernel_times(NS(events=lambda: events), on_gpu=True))
    assert got == [("_conv1x1_kernel", [], 7), ("add_kernel", ["aten::add"], 3.0)]
