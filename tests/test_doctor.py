"""`tunesmith doctor` and the hardware rules under it: one precision rule, parsers of /proc text,
4-bit status, and a report that always answers."""

import json
import sys
import types

import pytest
import torch

from tunesmith import doctor, hardware
from tunesmith.doctor import doctor_report, format_doctor
from tunesmith.hardware import (
    cpu_features_from_cpuinfo,
    cpu_model_from_cpuinfo,
    explain_dtype,
    four_bit_status,
    ram_from_meminfo,
    resolve_dtype,
)

# Two processors of a 4th-gen Xeon (flags shortened), as Linux writes /proc/cpuinfo.
XEON_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse sse2 avx fma avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse sse2 avx fma avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
"""
ZEN3_CPUINFO = """processor\t: 0
model name\t: AMD EPYC 7763 64-Core Processor
flags\t\t: fpu sse sse2 ssse3 fma sse4_1 avx f16c avx2 sha_ni
"""
# aarch64 kernels write `Features` and often no `model name`.
GRAVITON_CPUINFO = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes crc32 atomics fphp asimdhp asimddp sve bf16 i8mm
CPU implementer\t: 0x41
"""
MEMINFO = """MemTotal:       16384000 kB
MemFree:         2048000 kB
MemAvailable:    8192000 kB
Buffers:          100000 kB
HugePages_Total:       0
"""


def fake_cpu(monkeypatch, features):
    monkeypatch.setattr(hardware, "cpu_features", lambda: set(features))


@pytest.mark.parametrize("features, feature_name", [
    ({"avx2", "avx512f", "avx512_bf16"}, "AVX512-BF16"),
    ({"avx2", "amx_tile", "amx_bf16"}, "AMX-BF16"),
])
def test_auto_is_fp32_on_a_cpu_with_native_bf16_and_says_why(monkeypatch, features, feature_name):
    """tunesmith's fused CPU paths are fp32: on an AMX Xeon they trained faster than bf16 (bench/RESULTS.md)."""
    fake_cpu(monkeypatch, features)
    dtype, reason = explain_dtype("cpu")
    assert dtype == torch.float32
    assert feature_name in reason and "model.dtype: bfloat16" in reason
    assert resolve_dtype("auto", "cpu") == torch.float32


@pytest.mark.parametrize("features", [set(), {"avx2", "fma"}, {"avx512f", "avx512bw", "avx512_vnni", "amx_tile"},
                                      {"asimd", "bf16"}])
def test_auto_is_fp32_on_a_cpu_without_native_bf16(monkeypatch, features):
    fake_cpu(monkeypatch, features)
    dtype, reason = explain_dtype("cpu")
    assert dtype == torch.float32
    assert "AMX-BF16" in reason and "AVX512-BF16" in reason
    assert resolve_dtype("auto", "cpu") == torch.float32


@pytest.mark.parametrize("features", [set(), {"amx_bf16", "avx512_bf16"}])
def test_an_explicit_precision_wins_over_the_cpu(monkeypatch, features):
    fake_cpu(monkeypatch, features)
    assert resolve_dtype("float32", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16


def fake_cuda(monkeypatch, name, capability):
    """One CUDA GPU as torch.cuda would describe it, on a machine that has none."""
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: name)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=0: (6 * 2**30, 16 * 2**30))


def test_auto_on_cuda_follows_compute_capability_not_emulated_bf16(monkeypatch):
    fake_cuda(monkeypatch, "NVIDIA A100", (8, 0))
    dtype, reason = explain_dtype("cuda")
    assert dtype == resolve_dtype("auto", "cuda") == torch.bfloat16 and "8.0" in reason
    # a T4 (7.5) can emulate bf16, so torch.cuda.is_bf16_supported() says yes; auto must still pick fp16
    fake_cuda(monkeypatch, "Tesla T4", (7, 5))
    dtype, reason = explain_dtype("cuda")
    assert dtype == resolve_dtype("auto", "cuda") == torch.float16 and "Tesla T4" in reason and "7.5" in reason


def test_doctor_report_lists_a_cuda_gpu_with_its_capability_and_memory(monkeypatch):
    fake_cuda(monkeypatch, "Tesla T4", (7, 5))
    monkeypatch.setattr(doctor, "four_bit_status", lambda: (True, "fake"))
    report = doctor_report()
    assert report["device"] == "cuda" and report["precision"]["dtype"] == "float16"
    assert report["devices"][0] == {"kind": "cuda", "index": 0, "name": "Tesla T4", "compute_capability": "7.5",
                                    "bf16": False}
    assert report["memory"]["gpus"][0]["total_bytes"] == 16 * 2**30
    assert any("Tesla T4" in s and "fp16" in s for s in report["suggestions"])
    assert not any("no GPU found" in s for s in report["suggestions"])
    text = format_doctor(report)
    assert "cuda:0 (used)" in text and "compute capability 7.5, bf16 no" in text and "16.0 GiB total, 6.0 GiB free" in text


def test_auto_on_gpus_without_cuda_and_on_unknown_devices():
    assert explain_dtype("xpu")[0] == resolve_dtype("auto", "xpu") == torch.bfloat16
    assert explain_dtype("mps")[0] == resolve_dtype("auto", "mps") == torch.float16
    dtype, reason = explain_dtype("npu")
    assert dtype == torch.float32 and "'npu'" in reason


def test_cpu_features_parse_x86_flags_keeping_only_training_extensions():
    features = cpu_features_from_cpuinfo(XEON_CPUINFO)
    assert {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8", "fma", "avx512_vnni"} <= features
    assert "sse2" not in features and "fpu" not in features
    assert cpu_features_from_cpuinfo(ZEN3_CPUINFO) == {"fma", "avx", "f16c", "avx2"}
    assert cpu_model_from_cpuinfo(XEON_CPUINFO) == "Intel(R) Xeon(R) Platinum 8480+"


def test_cpu_features_parse_arm_and_only_count_what_every_processor_has():
    assert cpu_features_from_cpuinfo(GRAVITON_CPUINFO) == {"asimd", "asimdhp", "asimddp", "sve", "bf16", "i8mm"}
    assert cpu_model_from_cpuinfo(GRAVITON_CPUINFO) is None
    mixed = XEON_CPUINFO.replace(" amx_bf16", "", 1)  # processor 0 lacks AMX-BF16
    assert "amx_bf16" not in cpu_features_from_cpuinfo(mixed)
    assert cpu_features_from_cpuinfo("") == set()


def test_unreadable_proc_files_give_empty_and_unknown(monkeypatch):
    monkeypatch.setattr(hardware, "_read_text", lambda path: None)
    assert hardware.cpu_features() == set()
    assert explain_dtype("cpu")[0] == torch.float32
    assert isinstance(hardware.cpu_model_name(), str) and hardware.cpu_model_name()
    memory = hardware.memory_info()
    assert memory["ram_available_bytes"] is None and memory["ram_limit_bytes"] is None


def test_meminfo_is_parsed_to_bytes_preferring_memavailable():
    assert ram_from_meminfo(MEMINFO) == {"total_bytes": 16384000 * 1024, "available_bytes": 8192000 * 1024}
    old_kernel = MEMINFO.replace("MemAvailable:    8192000 kB\n", "")
    assert ram_from_meminfo(old_kernel)["available_bytes"] == 2048000 * 1024
    assert ram_from_meminfo("nothing here") == {"total_bytes": None, "available_bytes": None}


def test_memory_info_on_this_machine_reads_real_ram():
    memory = hardware.memory_info()
    assert memory["ram_total_bytes"] > 2**28  # more than 256 MiB
    if memory["ram_available_bytes"] is not None:
        assert 0 < memory["ram_available_bytes"] <= memory["ram_total_bytes"]
    assert len(memory["gpus"]) == torch.cuda.device_count() if torch.cuda.is_available() else memory["gpus"] == []


def test_four_bit_says_not_installed_and_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise ImportError
    available, detail = four_bit_status()
    assert available is False
    assert "not installed" in detail and "pip install bitsandbytes" in detail


def fake_bitsandbytes(monkeypatch, quantize):
    functional = types.ModuleType("bitsandbytes.functional")
    functional.quantize_4bit = quantize
    functional.dequantize_4bit = lambda packed, state: packed
    package = types.ModuleType("bitsandbytes")
    package.__version__ = "9.9.9"
    package.functional = functional
    monkeypatch.setitem(sys.modules, "bitsandbytes", package)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", functional)


def test_four_bit_reports_a_kernel_that_fails_on_the_device(monkeypatch):
    def no_kernel(weight, **kwargs):
        raise RuntimeError("no 4-bit kernel for this device\nlong traceback text")

    fake_bitsandbytes(monkeypatch, no_kernel)
    available, detail = four_bit_status()
    assert available is False
    assert "9.9.9" in detail and "no 4-bit kernel for this device" in detail and "long traceback" not in detail


def test_four_bit_checks_the_round_trip_not_only_that_it_ran(monkeypatch):
    fake_bitsandbytes(monkeypatch, lambda weight, **kwargs: (weight.clone(), None))
    assert four_bit_status()[0] is True
    fake_bitsandbytes(monkeypatch, lambda weight, **kwargs: (torch.zeros_like(weight), None))
    available, detail = four_bit_status()
    assert available is False and "wrong" in detail


def test_doctor_report_on_this_machine(monkeypatch):
    # importing a real bitsandbytes takes seconds (it calls torch.compile); the slow test below covers it
    monkeypatch.setattr(doctor, "four_bit_status", lambda: (False, "4-bit left out of this test"))
    report = doctor_report()
    assert {"device", "devices", "cpu", "precision", "four_bit", "memory", "versions", "suggestions"} <= set(report)
    assert report["devices"][-1]["kind"] == "cpu"
    assert report["precision"]["dtype"] == str(resolve_dtype("auto", report["device"])).replace("torch.", "")
    assert report["versions"]["torch"].startswith(torch.__version__.split("+")[0])
    assert report["versions"]["transformers"][0].isdigit()
    assert report["versions"]["bitsandbytes"]  # a version or "not installed"
    assert report["cpu"]["usable_cpus"] >= 1
    if report["device"] == "cpu":
        assert any("no GPU found" in s for s in report["suggestions"])
    json.dumps(report)  # JSON-ready, for a --json flag or the studio

    text = format_doctor(report)
    assert report["precision"]["dtype"] in text and report["precision"]["reason"] in text
    assert report["four_bit"]["detail"] in text
    assert "transformers" in text and report["versions"]["transformers"] in text


def test_doctor_report_answers_when_a_piece_cannot_be_read(monkeypatch):
    def broken():
        raise OSError("permission denied")

    monkeypatch.setattr(doctor, "four_bit_status", broken)
    monkeypatch.setattr(doctor, "memory_info", broken)
    monkeypatch.setattr(doctor, "cpu_model_name", broken)
    report = doctor_report()
    assert report["memory"]["ram_total_bytes"] is None
    assert report["cpu"]["model"] == "unknown"
    text = format_doctor(report)
    assert "unknown total" in text
    assert report["four_bit"] == {"available": False, "detail": "unknown"}


@pytest.mark.slow
def test_four_bit_status_with_the_installed_bitsandbytes():
    """With bitsandbytes installed, the real NF4 round trip runs on this device and leaves the global RNG alone."""
    if doctor.package_version("bitsandbytes") == "not installed":
        available, detail = four_bit_status()
        assert available is False and "pip install bitsandbytes" in detail
        return
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    available, detail = four_bit_status()
    assert torch.equal(torch.rand(3), expected)
    assert doctor.package_version("bitsandbytes") in detail
    if available:
        error = float(detail.rsplit("error ", 1)[1].rstrip(").").strip())
        assert 0.02 < error < 0.2  # NF4 on a Gaussian: about 0.09
