#!/usr/bin/env python3
"""moekit against Hugging Face transformers and llama.cpp (llama-cpp-python) on the same random weights, CPU.

    python3 benchmarks/vs_llamacpp.py --shape tiny --prompt 32 --decode 8 --rounds 1   # smoke run, ~1 minute once built
    python3 benchmarks/vs_llamacpp.py --shape qwen3moe          # Qwen3-MoE shape, 512-token prompt, 128 decoded
    python3 benchmarks/vs_llamacpp.py --shape olmoe --dtypes bf16 --gguf-types bf16,q8_0   # OLMoE-1B-7B shape
    python3 benchmarks/vs_llamacpp.py --shape mixtral --layers 4 --engines moekit,llamacpp  # a coarse Mixtral
    python3 benchmarks/vs_llamacpp.py --shape tiny --llama-src ~/llama_cpp_python-0.3.36.tar.gz  # given converter

Writes ``benchmarks/results/vs_llamacpp_<shape>.json`` (``--out``) and prints one table.

Shapes (``--shape``; ``--layers`` and ``--dim`` override, heads follow the dim at a fixed head width):
  olmoe     OLMoE-1B-7B: 16 layers, d=2048, 16 heads of 128, 64 experts of width 1024, top-8, vocab 50304
            (``olmoe`` architecture; 6.9B parameters: 13.8 GB in bf16, fp32 needs ~28 GB and is skipped where
            the memory is not there)
  qwen3moe  Qwen3-MoE: 12 layers, d=1024, 16 query / 4 kv heads of 64, 32 experts of width 512, top-4,
            vocab 32000, untied head (``qwen3_moe``)
  mixtral   a coarse Mixtral: 8 layers, d=1024, 8 query / 2 kv heads of 128, 8 experts of width 4d, top-2,
            vocab 32000 (``mixtral``)
  tiny      qwen3_moe, 2 layers, d=64, 4 / 2 heads of 16, 8 experts of width 32, top-2, vocab 512 (smoke runs)

The model is built once (in a child process) with random weights as a Hugging Face checkpoint in ``--work-dir``
(default ``benchmarks/results/vs_llamacpp/<shape>/hf``): the config from transformers (``AutoConfig.for_model``),
``AutoModelForCausalLM.from_config`` initialised by transformers with ``initializer_range=--init-std`` (0.02: small
router logits, so top-k routing spreads tokens over the experts; the moekit worker reports the per-layer load
imbalance of the prompt), saved with ``save_pretrained`` in bf16 safetensors, plus a tiny byte-level BPE tokenizer
(``tokenizers``; the benchmark feeds token ids, the tokenizer only has to exist for the converter). The GGUF files
(``--gguf-types``: bf16, f16, q8_0, ...) are made from that checkpoint by llama.cpp's own
``convert_hf_to_gguf.py --outtype T``, from the llama.cpp tree vendored in the llama-cpp-python source
distribution of the INSTALLED llama-cpp-python version: ``--llama-src`` names that tree, an extracted sdist or the
sdist tarball; by default it is fetched once with ``pip download --no-deps --no-binary :all:
llama-cpp-python==<version>`` and its converter, ``conversion/`` and ``gguf-py/`` extracted into
``$TMPDIR/moekit-llama.cpp-<version>`` (nothing of llama.cpp is written into this repository). The converter
identifies a BPE pre-tokenizer by hashing the token ids of a test string against a table of known models
(``get_vocab_base_pre``) and refuses an unknown one; it has no option to name one. The conversion therefore runs
the converter through a small driver that replaces that method at run time with one returning ``"default"``
(the tokenizer.ggml.pre entry only decides how llama.cpp splits TEXT, which is never tokenized here) and makes the
sentencepiece probe fail with FileNotFoundError as it does without a tokenizer.model (so the sentencepiece package
is not needed). The converter's own ``gguf-py`` is used unless ``NO_LOCAL_GGUF`` is set (then PyPI ``gguf``).

Method: every engine x dtype runs in its OWN fresh process (this script with ``--worker``), so one engine's
allocator, thread pools and caches cannot help or hurt another, and peak RSS is its own; all with the same
environment (``moekit.cli.ALLOCATOR_ENV``: this script re-executes itself with it, ``moekit.cli._tune_allocator``)
and the same thread count (``--threads``, default ``os.cpu_count()``: ``torch.set_num_threads`` for moekit and
transformers, ``n_threads``/``n_threads_batch`` for llama.cpp; ``OMP_NUM_THREADS`` likewise). Rounds are
interleaved (``--rounds``, default 3: round r runs every engine once, the order rotated by r) and medians over
rounds are reported. Each worker measures:
  load s        from the parent's spawn of the process to the model ready for input (interpreter start, imports,
                reading the weights; the page cache is warm after the first worker). llama.cpp reads the file
                (``use_mmap=False``) so that its load, like torch's, materialises the weights.
  warm-up       ``--warmup`` untimed generations first (the full prompt and 4 decode steps): torch.compile /
                oneDNN primitive creation and llama.cpp's graph allocation happen there (reported as warmup_s)
  prompt tok/s  the prompt pass of ``--prompt`` tokens (default 512; random ids from a fixed seed, the same for
                every engine) with an empty KV cache, up to the first greedy token. moekit: the first token of
                ``moekit.model.generate.sample_tokens(model, prompt, decode + 1, temperature=0.0)``, which runs
                ``Transformer.forward`` with a ``KVCache``; transformers: ``model(input_ids, use_cache=True,
                logits_to_keep=1)``, the prefill of ``generate()``; llama.cpp: ``Llama(..., n_ctx=prompt+decode,
                n_batch=prompt, logits_all=False).eval(prompt)``, then the last row of the logits. So each engine
                runs its own generation path's prompt pass: moekit's is whatever sample_tokens does (a version
                that applies the head to every prompt position pays for it: the JSON records the head's share of
                a token's forward FLOPs, ``head_share_of_forward_flops``).
  decode tok/s  ``--decode`` (default 128) further single-token steps at batch 1, greedy (argmax over the full
                vocabulary in fp32), each feeding the token the previous step chose.
  peak RSS      the worker's VmHWM (/proc/self/status) at the end; ``resource.getrusage(RUSAGE_SELF).ru_maxrss``
                is recorded too, but on Linux it carries the parent's RSS at the fork over the execve.
Greedy agreement: the first ``--agree-tokens`` (8) generated ids of each engine against a reference (transformers
fp32, else moekit fp32, else the first engine run), as the length of the common prefix: reported, never a failure
(bf16 rounds differently in each library, and random-weight logits are close to flat, so ties break differently).

Bandwidth: a streaming probe (``torch.sum`` over a ``--probe-gib`` GiB fp32 tensor, best of 5) gives the host's
GB/s; the weight bytes a decode step must stream are the ACTIVE parameters (``moekit.model.costs.costs``: attention,
norms, routers, top-k experts, the output head) less the input embedding table, which is a lookup of one row (kept
when tied: it is the head), times bytes per element (bf16 2, fp32 4); for a GGUF the bytes are read from the file
(``gguf.GGUFReader``: each tensor's size, expert tensors scaled by top_k / n_experts, f32 norms and router
included; q8_0 is 34 bytes per 32 values). Achieved bandwidth fraction = bytes x decode tok/s / probe GB/s (the KV
cache reads are not counted; small models fit in the caches and exceed 1). ``x llama16`` is decode tok/s over
llama.cpp's best 16-bit (bf16/f16) decode tok/s.

Optional packages: a missing transformers skips that engine (it is also needed to BUILD the checkpoint: ``pip
install transformers``), a missing llama-cpp-python (``pip install llama-cpp-python``) or converter ``gguf``
package (``pip install gguf``) skips llama.cpp, each with a printed reason; ``--engines`` picks the engines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# (importing moekit loads torch: the llama.cpp worker never imports it, so every moekit import sits in a function)

ENGINES = ("moekit", "transformers", "llamacpp")
TORCH_DTYPES = ("bf16", "fp32")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
BYTES_PER_ELEMENT = {"fp32": 4.0, "bf16": 2.0, "f32": 4.0, "f16": 2.0, "q8_0": 34 / 32}
PIP_NAMES = {"transformers": "transformers", "llama_cpp": "llama-cpp-python", "gguf": "gguf"}
MAX_POSITIONS = 4096  # max_position_embeddings of every shape (moekit's KVCache preallocates this many positions)
SPECIAL = "<|endoftext|>"
WARMUP_DECODE = 4  # decode steps of a warm-up generation


@dataclass(frozen=True)
class Shape:
    arch: str  # Hugging Face model_type
    layers: int
    dim: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int
    expert_ffn: int
    top_k: int
    vocab: int
    tie: bool = False


SHAPES = {
    "olmoe": Shape("olmoe", 16, 2048, 16, 16, 128, 64, 1024, 8, 50304),
    "qwen3moe": Shape("qwen3_moe", 12, 1024, 16, 4, 64, 32, 512, 4, 32000),
    "mixtral": Shape("mixtral", 8, 1024, 8, 2, 128, 8, 4096, 2, 32000),
    "tiny": Shape("qwen3_moe", 2, 64, 4, 2, 16, 8, 32, 2, 512),
}


def shape_of(name: str, layers: int | None, dim: int | None) -> Shape:
    """The named shape with ``--layers``/``--dim`` applied: heads = dim / head_dim at the same query/kv ratio;
    the mixtral shape keeps experts of width 4d."""
    s = SHAPES[name]
    if layers:
        s = replace(s, layers=layers)
    if dim and dim != s.dim:
        if dim % s.head_dim:
            raise SystemExit(f"--dim {dim}: must be a multiple of the head width {s.head_dim}")
        heads = dim // s.head_dim
        group = s.heads // s.kv_heads
        s = replace(s, dim=dim, heads=heads, kv_heads=max(1, heads // group),
                    expert_ffn=4 * dim if name == "mixtral" else s.expert_ffn)
    return s


def hf_config_kwargs(s: Shape, init_std: float, special_id: int) -> dict:
    """``AutoConfig.for_model(s.arch, **kwargs)`` arguments of a shape."""
    common = dict(vocab_size=s.vocab, hidden_size=s.dim, num_hidden_layers=s.layers, num_attention_heads=s.heads,
                  num_key_value_heads=s.kv_heads, max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=s.tie,
                  initializer_range=init_std, num_experts_per_tok=s.top_k, bos_token_id=special_id,
                  eos_token_id=special_id)
    if s.arch == "olmoe":  # head width dim / heads (no head_dim key), qk-norm over the projection, no renorm
        return dict(common, intermediate_size=s.expert_ffn, num_experts=s.experts, norm_topk_prob=False)
    if s.arch == "qwen3_moe":
        return dict(common, head_dim=s.head_dim, intermediate_size=4 * s.dim, moe_intermediate_size=s.expert_ffn,
                    num_experts=s.experts, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    if s.arch == "mixtral":
        return dict(common, head_dim=s.head_dim, intermediate_size=s.expert_ffn, num_local_experts=s.experts,
                    sliding_window=None)
    raise SystemExit(f"unknown architecture {s.arch}")


# ---------------------------------------------------------------------------------------------- small helpers
def have(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def version_of(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def mem_available() -> int | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def ru_maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def peak_rss_bytes() -> int:
    """This process's peak RSS: VmHWM of /proc/self/status where there is one (the high-water mark of the address
    space since exec), else ``getrusage(RUSAGE_SELF).ru_maxrss``. On Linux ru_maxrss keeps the high-water mark of
    the address space a process had before its execve, which for a child is its parent's RSS at the fork."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return ru_maxrss_bytes()


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def run_logged(cmd: list[str], log: Path, what: str, env: dict | None = None) -> None:
    """Run a child, its output into ``log``; on failure print the log's tail and stop."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise SystemExit(f"{what} failed (exit {rc}); the end of {log}:\n{tail}")
    print(f"  {what}: {time.perf_counter() - t0:.1f} s (log {log})")


# ---------------------------------------------------------------------------------------------- building
def build_worker(spec: dict) -> None:
    """Child process: write the random-weight Hugging Face checkpoint and its tokenizer into spec['hf_dir']."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = Path(spec["hf_dir"])
    s = Shape(**spec["shape"])
    # the tokenizer: byte-level BPE (256 byte tokens, a few merges, one special token at id 0) trained on this
    # file's docstring; converted by llama.cpp as a "gpt2" vocabulary padded to vocab_size with [PADn] entries
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(s.vocab, 320), special_tokens=[SPECIAL], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([__doc__ or "moekit"], trainer)
    special_id = tok.token_to_id(SPECIAL)
    torch.manual_seed(spec["seed"])
    cfg = transformers.AutoConfig.for_model(s.arch, **hf_config_kwargs(s, spec["init_std"], special_id))
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"built {type(model).__name__}: {n_params / 1e6:.1f}M parameters in {time.perf_counter() - t0:.1f} s")
    model.save_pretrained(out)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL)
    fast.save_pretrained(out)
    print(f"saved to {out} in {time.perf_counter() - t0:.1f} s")


def ensure_checkpoint(work: Path, s: Shape, args) -> Path:
    """The HF checkpoint of ``s`` in ``work/hf`` (built unless one with the same spec is there)."""
    hf_dir = work / "hf"
    marker = work / "build.json"
    spec = {"shape": asdict(s), "seed": args.seed, "init_std": args.init_std, "hf_dir": str(hf_dir)}
    if not args.rebuild and marker.is_file() and json.loads(marker.read_text()) == spec:
        return hf_dir
    if not have("transformers") or not have("tokenizers"):
        raise SystemExit("building the checkpoint needs transformers and tokenizers: pip install transformers")
    if hf_dir.exists():
        shutil.rmtree(hf_dir)
    for old in work.glob("model-*.gguf"):
        old.unlink()
    work.mkdir(parents=True, exist_ok=True)
    spec_path = work / "build_spec.json"
    spec_path.write_text(json.dumps(spec))
    print(f"building the random-weight checkpoint {hf_dir}")
    run_logged([sys.executable, str(Path(__file__).resolve()), "--build-worker", str(spec_path)], work / "build.log",
               "build")
    marker.write_text(json.dumps(spec))
    return hf_dir


# The conversion driver: the converter with two methods replaced (see the module docstring), run as __main__.
CONVERT_DRIVER = r"""
import sys
src, argv = sys.argv[1], sys.argv[2:]
sys.path.insert(0, src)
import convert_hf_to_gguf as converter  # puts its gguf-py on sys.path unless NO_LOCAL_GGUF

def _pre(self, tokenizer):
    return "default"  # the benchmark's own tokenizer: no known hash; the name only affects text splitting

def _no_sentencepiece(self, *a, **k):
    raise FileNotFoundError("no tokenizer.model: the benchmark checkpoint has a tokenizer.json only")

modules = [converter]
try:
    import conversion.base
    modules.append(conversion.base)
except ImportError:  # older llama.cpp: one file
    pass
patched = 0
for module in modules:
    for obj in list(vars(module).values()):
        if isinstance(obj, type) and "get_vocab_base_pre" in vars(obj):
            obj.get_vocab_base_pre = _pre
            patched += 1
        if isinstance(obj, type) and "_create_vocab_sentencepiece" in vars(obj):
            obj._create_vocab_sentencepiece = _no_sentencepiece
if not patched:
    raise SystemExit("convert_hf_to_gguf: no get_vocab_base_pre to replace (unknown converter layout)")
sys.argv = ["convert_hf_to_gguf.py", *argv]
converter.main()
"""


def llama_src_dir(arg: str | None, version: str) -> Path:
    """The llama.cpp tree holding convert_hf_to_gguf.py (see --llama-src)."""
    def tree(p: Path) -> Path | None:
        for cand in (p, p / "vendor" / "llama.cpp", *p.glob("*/vendor/llama.cpp")):
            if (cand / "convert_hf_to_gguf.py").is_file():
                return cand
        return None

    if arg:
        p = Path(arg).expanduser()
        if p.is_dir():
            found = tree(p)
            if found is None:
                raise SystemExit(f"--llama-src {p}: no convert_hf_to_gguf.py there or under vendor/llama.cpp")
            return found
        if p.is_file():
            return extract_converter(p, Path(tempfile.gettempdir()) / f"moekit-llama.cpp-{p.name.split('.tar')[0]}")
        raise SystemExit(f"--llama-src {p}: no such file or directory")
    dest = Path(tempfile.gettempdir()) / f"moekit-llama.cpp-{version}"
    if tree(dest):
        return dest
    download = Path(tempfile.gettempdir()) / f"moekit-llama-cpp-python-sdist-{version}"
    tarballs = sorted(download.glob("llama_cpp_python-*.tar.gz"))
    if not tarballs:
        print(f"  fetching the llama-cpp-python {version} source distribution (its llama.cpp converter)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={version}", "-d", str(download)]
        download.mkdir(parents=True, exist_ok=True)
        run_logged(cmd, download / "pip-download.log", "pip download")
        tarballs = sorted(download.glob("llama_cpp_python-*.tar.gz"))
        if not tarballs:
            raise SystemExit(f"pip download left no llama_cpp_python-*.tar.gz in {download}")
    return extract_converter(tarballs[-1], dest)


def extract_converter(tarball: Path, dest: Path) -> Path:
    """Extract vendor/llama.cpp/{convert_hf_to_gguf.py, conversion/, gguf-py/} of an sdist into ``dest``."""
    import tarfile

    if (dest / "convert_hf_to_gguf.py").is_file():
        return dest
    keep = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + "-", dir=dest.parent))
    with tarfile.open(tarball) as tf:
        members = []
        for m in tf.getmembers():
            _, sep, rel = m.name.partition("/vendor/llama.cpp/")
            if sep and rel.startswith(keep) and (m.isfile() or m.isdir()):
                m.name = rel
                members.append(m)
        if not any(m.name == "convert_hf_to_gguf.py" for m in members):
            raise SystemExit(f"{tarball}: no vendor/llama.cpp/convert_hf_to_gguf.py in it")
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tf.extractall(tmp, members=members, **kwargs)
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    print(f"  extracted llama.cpp's converter from {tarball} into {dest}")
    return dest


def ensure_gguf(work: Path, hf_dir: Path, gtype: str, src: Path) -> Path:
    out = work / f"model-{gtype}.gguf"
    if out.is_file() and out.stat().st_mtime >= (work / "build.json").stat().st_mtime:
        return out
    tmp = out.with_suffix(".gguf.part")
    cmd = [sys.executable, "-c", CONVERT_DRIVER, str(src), str(hf_dir), "--outfile", str(tmp), "--outtype", gtype]
    run_logged(cmd, work / f"convert-{gtype}.log", f"convert_hf_to_gguf --outtype {gtype}")
    tmp.rename(out)
    return out


def gguf_streamed_bytes(path: Path, top_k: int, n_experts: int, src: Path | None) -> int | None:
    """Bytes a decode step reads from a GGUF: every tensor but the input embedding (unless it is also the head),
    expert tensors (``*_exps``) at top_k / n_experts."""
    try:
        import gguf
    except ImportError:
        if src is None or not (src / "gguf-py").is_dir():
            return None
        sys.path.insert(0, str(src / "gguf-py"))
        try:
            import gguf
        except ImportError:
            return None
    reader = gguf.GGUFReader(str(path))
    names = {t.name for t in reader.tensors}
    total = 0.0
    for t in reader.tensors:
        if t.name == "token_embd.weight" and "output.weight" in names:
            continue
        total += int(t.n_bytes) * (top_k / n_experts if "_exps" in t.name else 1.0)
    return int(total)


# ---------------------------------------------------------------------------------------------- workers
def worker(spec_path: str, t_spawn: float) -> None:
    """Child process: load one engine in one dtype, warm up, time a prompt pass and a decode, write the result."""
    spec = json.loads(Path(spec_path).read_text())
    runner = {"moekit": run_moekit, "transformers": run_transformers, "llamacpp": run_llamacpp}[spec["engine"]]
    res = runner(spec, t_spawn)
    res["peak_rss_bytes"] = peak_rss_bytes()
    res["ru_maxrss_bytes"] = ru_maxrss_bytes()
    P, D = len(spec["prompt"]), spec["decode"]
    res["prompt_tok_s"] = P / res["prompt_s"]
    res["decode_tok_s"] = D / res["decode_s"] if D else None
    Path(spec["result"]).write_text(json.dumps(res))


def _timed_torch(generate, spec: dict) -> dict:
    """Warm-up generations, then one timed: ``generate(n)`` yields n + 1 greedy ids (prompt pass, n decode steps)."""
    t0 = time.perf_counter()
    for _ in range(spec["warmup"]):
        for _tok in generate(WARMUP_DECODE):
            pass
    warm = time.perf_counter() - t0
    it = generate(spec["decode"])
    t0 = time.perf_counter()
    tokens = [next(it)]
    t1 = time.perf_counter()
    tokens += list(it)
    t2 = time.perf_counter()
    return {"warmup_s": warm, "prompt_s": t1 - t0, "decode_s": t2 - t1, "tokens": tokens}


def run_moekit(spec: dict, t_spawn: float) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    import moekit
    from moekit.model.generate import sample_tokens

    t_imports = time.time() - t_spawn
    model = moekit.from_pretrained(spec["hf_dir"], dtype=spec["dtype"], tokenizer=False).eval()
    load = time.time() - t_spawn
    prompt = spec["prompt"]

    def generate(n: int):
        return sample_tokens(model, prompt, max_new_tokens=n + 1, temperature=0.0)

    res = _timed_torch(generate, spec)
    if spec.get("routing_stats"):  # the prompt's routing (not timed): max / mean tokens per expert, per layer
        with torch.no_grad():
            out = model(torch.tensor([prompt]), aux=True)
        res["load_imbalance_per_layer"] = [round(float(s.load_imbalance), 3) for s in out.stats if s is not None]
    moe = model.moe_layers[0] if model.moe_layers else None
    res.update(load_s=load, imports_s=t_imports, weights_dtype=str(next(model.parameters()).dtype),
               threads=torch.get_num_threads(), moe_backend=getattr(getattr(moe, "config", None), "backend", None),
               version=moekit.__version__)
    return res


def run_transformers(spec: dict, t_spawn: float) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    import transformers

    t_imports = time.time() - t_spawn
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[spec["dtype"]]
    model = transformers.AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=dtype).eval()
    load = time.time() - t_spawn
    prompt = spec["prompt"]

    @torch.inference_mode()
    def generate(n: int):  # what generate() runs for greedy search, without its logits processors
        out = model(input_ids=torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        tok = int(out.logits[0, -1].float().argmax())
        yield tok
        for _ in range(n):
            out = model(input_ids=torch.tensor([[tok]]), past_key_values=cache, use_cache=True)
            tok = int(out.logits[0, -1].float().argmax())
            yield tok

    res = _timed_torch(generate, spec)
    res.update(load_s=load, imports_s=t_imports, weights_dtype=str(dtype), threads=torch.get_num_threads(),
               attn_implementation=getattr(model.config, "_attn_implementation", None),
               experts_implementation=getattr(model.config, "_experts_implementation", None),
               version=transformers.__version__)
    return res


def run_llamacpp(spec: dict, t_spawn: float) -> dict:
    import llama_cpp
    import numpy as np

    t_imports = time.time() - t_spawn
    prompt, D = spec["prompt"], spec["decode"]
    llm = llama_cpp.Llama(model_path=spec["gguf"], n_ctx=len(prompt) + max(D, WARMUP_DECODE),
                          n_batch=len(prompt), n_threads=spec["threads"], n_threads_batch=spec["threads"],
                          logits_all=False, use_mmap=False, flash_attn=spec["flash_attn"], verbose=False)
    load = time.time() - t_spawn
    n_vocab = llm.n_vocab()

    def greedy() -> int:  # the last evaluated position's logits (logits_all=False keeps only that row)
        return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,)).argmax())

    def generate(n: int):
        llm.reset()  # n_tokens = 0: the next eval drops every cached position
        llm.eval(prompt)
        tok = greedy()
        yield tok
        for _ in range(n):
            llm.eval([tok])
            tok = greedy()
            yield tok

    res = _timed_torch(generate, spec)
    res.update(load_s=load, imports_s=t_imports, threads=spec["threads"], flash_attn=spec["flash_attn"],
               version=getattr(llama_cpp, "__version__", None),
               system_info=llama_cpp.llama_print_system_info().decode(errors="replace"))
    return res


# ---------------------------------------------------------------------------------------------- parent
def bandwidth_probe(gib: float, threads: int) -> dict:
    """Streaming read bandwidth: torch.sum over a gib-GiB fp32 tensor, best of 5."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(int(gib * 2**30) // 4)
    times = []
    for _ in range(6):  # the first also faults nothing (ones() touched the pages) but warms the kernel
        t0 = time.perf_counter()
        float(x.sum())
        times.append(time.perf_counter() - t0)
    nbytes = x.numel() * 4
    del x
    best = min(times[1:])
    return {"gib": gib, "threads": threads, "best_s": best, "gb_s": nbytes / best / 1e9,
            "samples_gb_s": [nbytes / t / 1e9 for t in times[1:]]}


def main() -> None:
    if len(sys.argv) >= 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2], float(sys.argv[3]))
        return
    if len(sys.argv) >= 4 and sys.argv[1] == "--probe-worker":
        print(json.dumps(bandwidth_probe(float(sys.argv[2]), int(sys.argv[3]))))
        return
    if len(sys.argv) >= 3 and sys.argv[1] == "--build-worker":
        build_worker(json.loads(Path(sys.argv[2]).read_text()))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen3moe")
    p.add_argument("--layers", type=int, help="override the shape's layer count")
    p.add_argument("--dim", type=int, help="override the shape's model width (heads follow at the same head width)")
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated: moekit, transformers, llamacpp")
    p.add_argument("--dtypes", default="bf16,fp32", help="moekit and transformers weight dtypes: bf16, fp32")
    p.add_argument("--gguf-types", default="bf16,f16,q8_0", help="llama.cpp GGUF types (converter --outtype)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    p.add_argument("--decode", type=int, default=128, help="greedy decode steps after the prompt")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up generations per worker")
    p.add_argument("--agree-tokens", type=int, default=8, help="leading generated ids compared between engines")
    p.add_argument("--seed", type=int, default=0, help="weights and prompt seed")
    p.add_argument("--init-std", type=float, default=0.02, help="initializer_range of the random weights")
    p.add_argument("--probe-gib", type=float, default=1.0, help="size of the bandwidth probe's tensor")
    p.add_argument("--work-dir", help="checkpoint and GGUF cache (default benchmarks/results/vs_llamacpp/<shape>)")
    p.add_argument("--llama-src", help="llama.cpp tree with convert_hf_to_gguf.py, an extracted llama-cpp-python "
                                       "sdist or its .tar.gz (default: pip download the installed version's)")
    p.add_argument("--llama-flash-attn", action="store_true", help="Llama(flash_attn=True) (llama-cpp-python's "
                                                                   "default is off)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the checkpoint and the GGUF files")
    p.add_argument("--no-memory-check", action="store_true",
                   help="run workers whose weights exceed the available memory (default: skip them)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per worker")
    p.add_argument("--out", help="JSON path (default benchmarks/results/vs_llamacpp_<shape>.json)")
    args = p.parse_args()

    from moekit.cli import _tune_allocator

    _tune_allocator([sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]])
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from moe_layer import load_now, machine, write_results

    from moekit.formats.load import config_of
    from moekit.host import probe_host
    from moekit.model.costs import costs

    s = shape_of(args.shape, args.layers, args.dim)
    tag = args.shape + (f"-L{s.layers}" if args.layers else "") + (f"-d{s.dim}" if args.dim else "")
    work = Path(args.work_dir) if args.work_dir else ROOT / "benchmarks" / "results" / "vs_llamacpp" / tag
    out_path = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"vs_llamacpp_{tag}.json"
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    gtypes = [g.strip() for g in args.gguf_types.split(",") if g.strip()]
    for what, vals, ok in (("--engines", engines, ENGINES), ("--dtypes", dtypes, TORCH_DTYPES),
                           ("--gguf-types", gtypes, GGUF_TYPES)):
        if bad := [v for v in vals if v not in ok]:
            raise SystemExit(f"{what}: unknown {', '.join(bad)} (choose from {', '.join(ok)})")
    if args.prompt < 1 or args.decode < 0 or args.rounds < 1 or args.threads < 1:
        raise SystemExit("--prompt, --rounds and --threads must be >= 1, --decode >= 0")
    if args.prompt + max(args.decode, WARMUP_DECODE) + 1 > MAX_POSITIONS:
        raise SystemExit(f"--prompt + --decode: at most {MAX_POSITIONS - 1} positions (max_position_embeddings)")

    host = probe_host()
    print(f"vs_llamacpp: shape {tag} ({s.arch}: {s.layers} layers, d={s.dim}, {s.heads}/{s.kv_heads} heads of "
          f"{s.head_dim}, {s.experts} experts of {s.expert_ffn}, top-{s.top_k}, vocab {s.vocab}); prompt "
          f"{args.prompt}, decode {args.decode}, {args.threads} threads, {args.rounds} rounds\nhost: {host.describe()}")

    skipped: list[dict] = []

    def skip(engine: str, dtype: str, reason: str) -> None:
        skipped.append({"engine": engine, "dtype": dtype, "reason": reason})
        print(f"  skip {engine} {dtype}: {reason}")

    if "transformers" in engines and not have("transformers"):
        for d in dtypes:
            skip("transformers", d, "transformers is not installed (pip install transformers)")
        engines.remove("transformers")
    llama_ok = "llamacpp" in engines
    if llama_ok and not have("llama_cpp"):
        for g in gtypes:
            skip("llamacpp", g, "llama-cpp-python is not installed (pip install llama-cpp-python)")
        llama_ok = False

    hf_dir = ensure_checkpoint(work, s, args)
    cfg = config_of(hf_dir)
    c = costs(cfg, seq_len=args.prompt)
    streamed = c.active_params - c.embedding_params + (c.embedding_params if cfg.tie_embeddings else 0)
    head_share = 2 * cfg.vocab_size * cfg.dim / c.flops_per_token_forward  # the head's part of one position

    ggufs: dict[str, Path] = {}
    src = None
    if llama_ok:
        try:
            src = llama_src_dir(args.llama_src, version_of("llama_cpp_python") or "")
        except SystemExit as e:  # no converter (e.g. no network for pip download): the other engines still run
            for g in gtypes:
                skip("llamacpp", g, f"no llama.cpp converter: {e}")
        local_gguf = src is not None and (src / "gguf-py").is_dir() and not os.environ.get("NO_LOCAL_GGUF")
        if src is not None and not local_gguf and not have("gguf"):
            for g in gtypes:
                skip("llamacpp", g, f"the converter needs the gguf package, not in {src} (pip install gguf)")
        elif src is not None:
            for g in gtypes:
                try:
                    ggufs[g] = ensure_gguf(work, hf_dir, g, src)
                except SystemExit as e:
                    skip("llamacpp", g, str(e))

    jobs = [(e, d) for e in engines if e != "llamacpp" for d in dtypes] + [("llamacpp", g) for g in ggufs]
    weight_bytes = {}
    for e, d in jobs:
        weight_bytes[(e, d)] = ggufs[d].stat().st_size if e == "llamacpp" else c.total_params * BYTES_PER_ELEMENT[d]
    avail = mem_available()
    if avail is not None and not args.no_memory_check:
        for job in list(jobs):
            if weight_bytes[job] > 0.9 * avail:
                skip(*job, f"weights {fmt_bytes(weight_bytes[job])} exceed 90% of the available memory "
                           f"{fmt_bytes(avail)} (--no-memory-check runs it anyway)")
                jobs.remove(job)
    if not jobs:
        raise SystemExit("nothing to run")

    bytes_per_token = {}
    for e, d in jobs:
        exact = gguf_streamed_bytes(ggufs[d], s.top_k, s.experts, src) if e == "llamacpp" else None
        bytes_per_token[f"{e}/{d}"] = exact if exact is not None else streamed * BYTES_PER_ELEMENT[d]

    print(f"  active parameters/token {c.active_params / 1e6:.1f}M of {c.total_params / 1e6:.1f}M; streamed per "
          f"decode step (no input embedding) {streamed / 1e6:.1f}M")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    script = str(Path(__file__).resolve())
    # in a child like the workers: the parent keeps no GiB of freed heap (ALLOCATOR_ENV does not trim) for them
    probe = json.loads(subprocess.run([sys.executable, script, "--probe-worker", str(args.probe_gib),
                                       str(args.threads)], env=env, capture_output=True, text=True,
                                      check=True).stdout.strip().splitlines()[-1])
    print(f"  memory bandwidth probe (torch.sum over {args.probe_gib:g} GiB fp32, best of 5): {probe['gb_s']:.1f} GB/s")

    import random

    rng = random.Random(args.seed)
    prompt = [rng.randrange(s.vocab) for _ in range(args.prompt)]
    samples: dict[str, list[dict]] = {f"{e}/{d}": [] for e, d in jobs}
    failures: dict[str, str] = {}
    load0 = load_now()
    with tempfile.TemporaryDirectory(prefix="vs_llamacpp-") as tmp:
        for r in range(args.rounds):
            order = jobs[r % len(jobs):] + jobs[:r % len(jobs)]
            for e, d in order:
                key = f"{e}/{d}"
                if key in failures:
                    continue
                spec = {"engine": e, "dtype": d, "hf_dir": str(hf_dir), "gguf": str(ggufs.get(d, "")),
                        "prompt": prompt, "decode": args.decode, "threads": args.threads, "warmup": args.warmup,
                        "flash_attn": args.llama_flash_attn, "routing_stats": e == "moekit" and r == 0,
                        "result": str(Path(tmp) / f"{e}-{d}-{r}.out.json")}
                spec_path = Path(tmp) / f"{e}-{d}-{r}.json"
                spec_path.write_text(json.dumps(spec))
                t0 = time.time()
                try:
                    proc = subprocess.run([sys.executable, script, "--worker", str(spec_path), repr(t0)], env=env,
                                          capture_output=True, text=True, timeout=args.timeout)
                    rc, log = proc.returncode, proc.stdout + proc.stderr
                except subprocess.TimeoutExpired as ex:
                    rc, log = "timeout", str(ex)
                if rc != 0 or not Path(spec["result"]).is_file():
                    failures[key] = f"exit {rc}: {log[-3000:]}"
                    print(f"  round {r}: {key} FAILED ({rc}):\n{log[-3000:]}")
                    continue
                res = json.loads(Path(spec["result"]).read_text())
                samples[key].append(res)
                dec = f"{res['decode_tok_s']:.1f}" if res["decode_tok_s"] else "-"
                print(f"  round {r}: {key:20s} load {res['load_s']:6.2f} s  prompt {res['prompt_tok_s']:9.1f} tok/s  "
                      f"decode {dec:>8s} tok/s  peak RSS {fmt_bytes(res['peak_rss_bytes'])}")

    def med(key: str, field: str):
        vals = [x[field] for x in samples[key] if x.get(field) is not None]
        return statistics.median(vals) if vals else None

    done = [k for k in samples if samples[k]]
    summary = {k: {f: med(k, f) for f in ("load_s", "imports_s", "warmup_s", "prompt_tok_s", "decode_tok_s",
                                          "peak_rss_bytes", "ru_maxrss_bytes")} for k in done}
    llama16 = [summary[k]["decode_tok_s"] for k in done
               if k.startswith("llamacpp/") and k.split("/")[1] in ("bf16", "f16") and summary[k]["decode_tok_s"]]
    best16 = max(llama16) if llama16 else None
    ref = next((k for k in ("transformers/fp32", "moekit/fp32") if k in done), done[0] if done else None)
    n_agree = args.agree_tokens
    ref_tokens = samples[ref][0]["tokens"][:n_agree] if ref else []
    for k in done:
        row = summary[k]
        toks = samples[k][0]["tokens"][:n_agree]
        prefix = 0
        for a, b in zip(toks, ref_tokens):
            if a != b:
                break
            prefix += 1
        row["tokens"] = samples[k][0]["tokens"]
        row["tokens_same_every_round"] = all(x["tokens"] == row["tokens"] for x in samples[k])
        row["agree_with_reference"] = prefix
        row["ratio_to_llamacpp_best16_decode"] = (row["decode_tok_s"] / best16
                                                   if best16 and row["decode_tok_s"] else None)
        row["bytes_per_token"] = bytes_per_token[k]
        row["bandwidth_fraction"] = (bytes_per_token[k] * row["decode_tok_s"] / (probe["gb_s"] * 1e9)
                                     if row["decode_tok_s"] else None)

    def f(v, spec):  # "-" for a missing value, right-aligned to the spec's width
        return "-".rjust(int(spec.split(".")[0])) if v is None else format(v, spec)

    print(f"\nshape {tag}, prompt {args.prompt}, decode {args.decode}, {args.threads} threads, medians of "
          f"{args.rounds} rounds; x llama16 = decode / llama.cpp's best 16-bit decode; bw = streamed weight bytes x "
          f"decode tok/s / {probe['gb_s']:.1f} GB/s; agree = leading ids equal to {ref}'s (of {n_agree})")
    print(f"  {'engine':13s} {'dtype':6s} {'load s':>7s} {'prompt tok/s':>13s} {'decode tok/s':>13s} "
          f"{'x llama16':>10s} {'bw':>6s} {'peak RSS':>10s} {'agree':>6s}")
    for k in done:
        e, d = k.split("/")
        row = summary[k]
        print(f"  {e:13s} {d:6s} {f(row['load_s'], '7.2f')} {f(row['prompt_tok_s'], '13.1f')} "
              f"{f(row['decode_tok_s'], '13.1f')} {f(row['ratio_to_llamacpp_best16_decode'], '10.2f')} "
              f"{f(row['bandwidth_fraction'], '6.3f')} {fmt_bytes(row['peak_rss_bytes']):>10s} "
              f"{row['agree_with_reference']:>3d}/{min(n_agree, len(ref_tokens))}")
    for k in failures:
        print(f"  {k}: failed, see the JSON")
    moe_first = next((samples[k][0] for k in done if k.startswith("moekit/")), None)
    if moe_first and moe_first.get("load_imbalance_per_layer"):
        print(f"  routing of the prompt (moekit, max/mean tokens per expert, 1 = balanced, "
              f"{s.experts / s.top_k:g} = all on the same experts): "
              + ", ".join(f"{x:.2f}" for x in moe_first["load_imbalance_per_layer"]))

    out = {"machine": machine(), "argv": sys.argv, "shape": {"name": tag, **asdict(s)}, "work_dir": str(work),
           "hf_dir": str(hf_dir), "ggufs": {g: str(q) for g, q in ggufs.items()},
           "llama_src": str(src) if src else None,
           "versions": {d: version_of(d) for d in ("torch", "transformers", "llama_cpp_python", "gguf", "tokenizers")},
           "platform": platform.platform(), "threads": args.threads, "rounds": args.rounds, "prompt": args.prompt,
           "decode": args.decode, "warmup": args.warmup, "seed": args.seed, "init_std": args.init_std,
           "llama_flash_attn": args.llama_flash_attn, "load_before": load0, "load_after": load_now(),
           "bandwidth_probe": probe,
           "params": {"total": c.total_params, "active": c.active_params, "embedding": c.embedding_params,
                      "streamed_per_decode_token": streamed, "head_share_of_forward_flops": head_share},
           "reference": ref, "summary": summary, "samples": samples, "skipped": skipped, "failures": failures}
    write_results(out, out_path)


if __name__ == "__main__":
    main()
