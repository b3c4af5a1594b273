"""Run a CPU benchmark in both CPU modes, one after the other, and put their figures side by side
(issue 29): natively, and restricted to what most laptops, CI runners and cloud VMs have, AVX2
without bf16.

    .venv/bin/python bench/cpu_modes.py -- bench/score_process.py --base /tmp/vaewatch-51279ae
    .venv/bin/python bench/cpu_modes.py -- bench/precision.py speed --threads 1
    .venv/bin/python bench/cpu_modes.py --modes avx2 -- bench/worker_throughput.py --model-kind mlp

The restricted mode sets ATEN_CPU_CAPABILITY=avx2 (ATen's vector kernels), ONEDNN_MAX_CPU_ISA=AVX2
(oneDNN's convolutions and GEMMs) and FBGEMM_ENABLE_INSTRUCTIONS=AVX2 (fbgemm's int8 kernels);
with ATen at AVX2, `detector.precision: auto` and `train.amp: auto` rule bf16 out
(detector.scorer.native_bf16). Before each run a probe checks that the mode holds: torch's CPU
capability, whether bf16 counts as native, and the ISA oneDNN reports and runs its kernels with
(ONEDNN_VERBOSE=1: no avx512 or amx kernel may run in the restricted mode). A mode that does
not hold stops the script. On a machine without AVX-512 both modes run the same kernels: the
restricted column then is the native one measured again.

A benchmark that prints lines `result: {json}` (flat name -> number) gets them in a table with
one column per mode; everything else it prints is passed through under a header per mode.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODES: dict[str, dict[str, str]] = {
    "native": {},
    "avx2": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
    },
}
RESULT = "result: "

_PROBE = """
import json, torch
from detector.scorer import fast_int8, native_bf16
x = torch.rand(4, 16, 12, 12).contiguous(memory_format=torch.channels_last)
conv = torch.nn.Conv2d(16, 16, 3).to(memory_format=torch.channels_last)
with torch.inference_mode():
    conv(x)
    torch.nn.functional.linear(torch.rand(64, 256), torch.rand(256, 256))
print("probe: " + json.dumps({
    "capability": torch.backends.cpu.get_cpu_capability(),
    "native_bf16": native_bf16(),
    "fast_int8": fast_int8(),
}))
"""


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_kind() -> str:
    flags = cpu_flags()
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        return "AVX-512 with bf16"
    if "avx512f" in flags:
        return "AVX-512, no bf16"
    return "AVX2, no AVX-512, no bf16" if "avx2" in flags else "no AVX2"


def env_for(mode: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in MODES["avx2"]}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env | MODES[mode]


def probe(mode: str) -> dict:
    """What torch and oneDNN do in `mode`; raises SystemExit when the restriction does not hold."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE],
        env=env_for(mode) | {"ONEDNN_VERBOSE": "1"},
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    lines = done.stdout.splitlines()
    found = json.loads(next(line for line in lines if line.startswith("probe: "))[7:])
    isa = [line.split("isa:", 1)[1] for line in lines if ",info,cpu,isa:" in line]
    kernels = {
        line.split(",")[6] for line in lines if line.startswith("onednn_verbose,v1,primitive,exec,")
    }
    found["onednn_isa"] = isa[0] if isa else "(not reported)"
    found["onednn_kernels"] = sorted(kernels)
    if mode == "avx2":
        wide = [k for k in kernels if "avx512" in k or "amx" in k]
        problems = []
        if found["capability"] != "AVX2":
            problems.append(f"ATen capability {found['capability']}")
        if found["native_bf16"]:
            problems.append("bf16 still counts as native")
        if "AVX2" not in found["onednn_isa"]:
            problems.append(f"oneDNN's ISA is {found['onednn_isa']}")
        if wide:
            problems.append(f"oneDNN ran {', '.join(wide)}")
        if problems:
            raise SystemExit(f"the AVX2 restriction does not hold: {'; '.join(problems)}")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- SCRIPT [ARGS...]")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the benchmark after --, e.g. -- bench/precision.py speed")
    print(f"machine CPU: {cpu_kind()}; modes {', '.join(args.modes)}; command {' '.join(command)}")
    results: dict[str, dict[str, float]] = {}
    for mode in args.modes:
        found = probe(mode)
        print(
            f"\n## mode {mode}: ATen {found['capability']}, oneDNN ISA {found['onednn_isa']}, "
            f"kernels {', '.join(found['onednn_kernels'])}; bf16 native for auto: "
            f"{found['native_bf16']}; int8 kernels: {found['fast_int8']}",
            flush=True,
        )
        process = subprocess.Popen(
            [sys.executable, *command], env=env_for(mode), stdout=subprocess.PIPE, text=True
        )
        figures: dict[str, float] = {}
        for line in process.stdout:
            if line.startswith(RESULT):
                figures |= json.loads(line[len(RESULT) :])
            print(line, end="", flush=True)
        if process.wait():
            raise SystemExit(f"{' '.join(command)} failed in mode {mode} ({process.returncode})")
        results[mode] = figures
    names = list(dict.fromkeys(name for figures in results.values() for name in figures))
    if names:
        print(f"\n| figure | {' | '.join(f'{m} ({cpu_kind()})' for m in results)} |")
        print("|---" + "|---:" * len(results) + "|")
        for name in names:
            cells = [_number(results[m].get(name)) for m in results]
            print(f"| {name} | {' | '.join(cells)} |")
    return 0


def _number(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


if __name__ == "__main__":
    sys.exit(main())
