"""The CPU a benchmark runs on, from lscpu: model, cores, frequency, SIMD flags and the fp32 peak they give."""
from __future__ import annotations

import os
import re
import subprocess


def cpu_info(text: str | None = None) -> dict:
    """lscpu's model name, core count, frequency and SIMD flags, and the fp32 FLOP per cycle estimated from them
    (`text`: lscpu's output; by default lscpu is run)."""
    if text is None:
        try:
            text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            text = ""
    fields = dict(re.findall(r"^([^:\n]+):\s*(.*)$", text, re.M))
    flags = set(fields.get("Flags", "").split())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mhz, how = None, ""
    for key in ("CPU max MHz", "CPU MHz"):
        if fields.get(key):
            mhz, how = float(fields[key]), key
            break
    if mhz is None and fields.get("BogoMIPS"):  # a VM often shows no frequency: BogoMIPS is 2 x the TSC rate
        mhz, how = float(fields["BogoMIPS"]) / 2, "BogoMIPS / 2"
    # fp32 FLOP per cycle per core: 2 FMA units x lanes x 2 (multiply and add). Intel server cores with AVX-512 have
    # two 512-bit FMA units (some parts have one: then half this peak); AMD Zen 4 (family 25 with AVX-512) runs each
    # 512-bit operation over its two 256-bit units, so its peak is AVX2's; AVX2 + FMA cores have two 256-bit ones.
    zen4 = "AuthenticAMD" in fields.get("Vendor ID", "") and fields.get("CPU family") == "25"
    if "avx512f" in flags and not zen4:
        per_cycle, simd = 2 * 16 * 2, "AVX-512 (2 FMA units x 16 fp32 lanes assumed)"
    elif "avx512f" in flags:
        per_cycle, simd = 2 * 8 * 2, "AVX-512 on Zen 4 (2 x 256-bit FMA units, 512-bit operations in two halves)"
    elif "avx2" in flags and "fma" in flags:
        per_cycle, simd = 2 * 8 * 2, "AVX2 + FMA (2 FMA units x 8 fp32 lanes)"
    else:
        per_cycle, simd = 8, "SSE (4 lanes, separate multiply and add)"
    return {"model": fields.get("Model name", "unknown"), "cores": cores, "mhz": mhz, "mhz_from": how,
            "avx512": sorted(f for f in flags if f.startswith("avx512")), "avx2": "avx2" in flags,
            "amx": sorted(f for f in flags if f.startswith("amx")), "simd": simd, "flop_per_cycle": per_cycle}


def peak_gflops(cpu: dict, threads: int) -> float | None:
    """fp32 peak of `threads` cores (at most the cores there are): cores x GHz x FLOP per cycle."""
    if not cpu["mhz"]:
        return None
    return min(threads, cpu["cores"]) * cpu["mhz"] / 1e3 * cpu["flop_per_cycle"]


def describe(cpu: dict, threads: int) -> str:
    """The CPU and its SIMD on one line; the peak assumed for `threads` threads on a second, where known."""
    peak = peak_gflops(cpu, threads)
    line = (f"CPU: {cpu['model']}, {cpu['cores']} cores, {cpu['mhz'] or '?'} MHz ({cpu['mhz_from']}); "
            f"AVX-512: {'yes (' + ' '.join(cpu['avx512']) + ')' if cpu['avx512'] else 'no'}; "
            f"AVX2: {'yes' if cpu['avx2'] else 'no'}; AMX: {' '.join(cpu['amx']) or 'no'}")
    if peak:
        line += (f"\npeak assumed: {min(threads, cpu['cores'])} cores x {cpu['mhz'] / 1e3:.2f} GHz x "
                 f"{cpu['flop_per_cycle']} fp32 FLOP/cycle ({cpu['simd']}) = {peak:.0f} GFLOP/s")
    return line
