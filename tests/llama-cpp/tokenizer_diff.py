#!/usr/bin/env python3
"""Differential check of `realm tokenize` against llama.cpp's llama_tokenize on random text.

Needs the llama.cpp built by scripts/build-llama-cpp.sh (libllama.so and llama-cpp-python's
ctypes bindings) and a release build of realm. Not part of CI (llama.cpp is not built there).

  tests/llama-cpp/tokenizer_diff.py VOCAB.gguf [--n 3000] [--parse-special] [--pre NAME]
      [--special TEXT ...] [--llama-cpp target/llama-cpp] [--realm target/release/realm]

--pre rewrites tokenizer.ggml.pre in a copy of a vocabulary-only GGUF, to exercise another
pre-tokenizer family with the same vocabulary.
"""
import argparse
import ctypes
import os
import random
import struct
import subprocess
import sys
import tempfile
import types

SEP = "\n__ggml_vocab_test__\n"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def bindings(llama_dir):
    base = os.path.join(llama_dir, "llama_cpp_python-0.3.36")
    os.environ["LLAMA_CPP_LIB_PATH"] = os.path.join(base, "vendor/llama.cpp/build/bin")
    # Import the ctypes module without the package's __init__ (which needs numpy and more).
    pkg = types.ModuleType("llama_cpp")
    pkg.__path__ = [os.path.join(base, "llama_cpp")]
    sys.modules["llama_cpp"] = pkg
    import llama_cpp.llama_cpp as L  # noqa: E402

    L.llama_backend_init()
    cb = L.llama_log_callback(lambda *a: None)
    L.llama_log_set(cb, None)
    return L, cb


def set_pre(src, dst, pre):
    b = bytearray(open(src, "rb").read())
    assert b[:4] == b"GGUF" and struct.unpack_from("<Q", b, 8)[0] == 0, "needs a vocab-only GGUF"
    key = b"tokenizer.ggml.pre"
    i = b.index(struct.pack("<Q", len(key)) + key) + 8 + len(key)
    assert struct.unpack_from("<I", b, i)[0] == 8
    n = struct.unpack_from("<Q", b, i + 4)[0]
    new = pre.encode()
    b[i + 4 : i + 12 + n] = struct.pack("<Q", len(new)) + new
    open(dst, "wb").write(bytes(b))


POOL = list("aAbBzZ éÉñçßøœ  \t\n\r\n\n  '''sStTmMdDlLrRvVeE 0123456789 ,.;:!?-_~$+<=>^`|@#%&*()[]{}\"/\\") + [
    "中文", "日本語", "한국어", "Ελληνικά", "русский", "العربية", "हिन्दी", "ภาษาไทย", "🦙", "🚀",
    "😶\u200d🌫️", "✅", "🇫🇷", "\u0301", "\u200b", "\u00a0", "\u3000", "\u0085", "½", "٣", "Ⅻ", "ﬁ",
    "Å", "K", "Ω", "\ue000", "\U0010fffd", "…", "。", "，", "’", "“", "—", "  ", "    ", "\t\t",
    "...", "!!!", "'s", "'LL", " the", "Hello", "world", "1234567", "3.14",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--parse-special", action="store_true")
    ap.add_argument("--pre")
    ap.add_argument("--special", nargs="*", default=[])
    ap.add_argument("--llama-cpp", default=os.path.join(ROOT, "target/llama-cpp"))
    ap.add_argument("--realm", default=os.path.join(ROOT, "target/release/realm"))
    a = ap.parse_args()
    L, _cb = bindings(a.llama_cpp)
    tmp = tempfile.mkdtemp()
    gguf = a.gguf
    if a.pre:
        gguf = os.path.join(tmp, "vocab.gguf")
        set_pre(a.gguf, gguf, a.pre)
    params = L.llama_model_default_params()
    params.vocab_only = True
    model = L.llama_model_load_from_file(gguf.encode(), params)
    if not model:
        sys.exit(f"llama.cpp could not load {gguf}")
    vocab = L.llama_model_get_vocab(model)

    def llama_ids(text):
        b = text.encode()
        buf = (L.llama_token * (len(b) + 8))()
        k = L.llama_tokenize(vocab, b, len(b), buf, len(b) + 8, False, a.parse_special)
        assert k >= 0
        return list(buf[:k])

    rng = random.Random(a.seed)
    pool = POOL + a.special
    cases = ["".join(rng.choice(pool) for _ in range(rng.randint(0, 30))) for _ in range(a.n)]
    inp = os.path.join(tmp, "cases.inp")
    open(inp, "w").write("".join(c + SEP for c in cases))
    args = [a.realm, "tokenize", gguf, "--tests", inp] + (["--parse-special"] if a.parse_special else [])
    got = subprocess.run(args, capture_output=True, text=True, check=True).stdout.split("\n")
    bad = 0
    for i, c in enumerate(cases):
        want = "".join(f" {t}" for t in llama_ids(c))
        if got[i] != want:
            bad += 1
            if bad <= 5:
                print(f"{c!r}\n  llama.cpp:{want}\n  realm:    {got[i]}")
    print(f"{os.path.basename(a.gguf)} pre={a.pre or '(as stored)'}: {len(cases)} cases, {bad} differ")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
