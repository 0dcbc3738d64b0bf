#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets into tests/fuzz/corpus/<target>/ (committed).

Tiny valid inputs, standard library only, each far below the fuzzers' -max_len (8192 bytes):
GGUF files (a llama and a bloom whose metadata and tensor shapes agree, one tensor of every
supported quantization type, a byte-level BPE tokenizer, every metadata value type), safetensors
files, JSON texts, HF config.json files and tokenizer.json files. Rerun after changing it:
    python3 tests/fuzz/make_seeds.py
Files named regress_* are inputs the fuzzers found (kept by hand, not written here).
"""
import json
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "corpus")


def write(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    assert len(data) <= 8192, (target, name, len(data))
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# --- GGUF -----------------------------------------------------------------------------------
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
PACK = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?",
        U64: "<Q", I64: "<q", F64: "<d"}


def gstr(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gval(t, v):
    if t == STR:
        return gstr(v)
    if t == ARR:
        et, items = v
        out = struct.pack("<IQ", et, len(items))
        for it in items:
            out += gval(et, it)  # an array element of an array is itself (type, items)
        return out
    return struct.pack(PACK[t], v)


class Gguf:
    def __init__(self, alignment=32):
        self.kv = []
        self.tensors = []  # (name, ggml dims, type, bytes)
        self.alignment = alignment

    def key(self, k, t, v):
        self.kv.append(gstr(k) + struct.pack("<I", t) + gval(t, v))
        return self

    def f32_tensor(self, name, dims):
        n = 1
        for d in dims:
            n *= d
        data = b"".join(struct.pack("<f", (i % 7) * 0.25 - 0.5) for i in range(n))
        self.tensors.append((name, dims, 0, data))
        return self

    def raw_tensor(self, name, dims, type_id, data):
        self.tensors.append((name, dims, type_id, data))
        return self

    def bytes(self):
        a = self.alignment
        out = b"GGUF" + struct.pack("<IQQ", 3, len(self.tensors), len(self.kv)) + b"".join(self.kv)
        at = 0
        for name, dims, t, data in self.tensors:
            out += gstr(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
            out += struct.pack("<IQ", t, at)
            at = (at + len(data) + a - 1) // a * a
        out += b"\0" * (-len(out) % a)
        start = len(out)
        for _, _, _, data in self.tensors:
            out += data
            out += b"\0" * (-(len(out) - start) % a)
        return out


def tiny_llama(extra_tokens=False):
    g = Gguf()
    g.key("general.architecture", STR, "llama").key("llama.embedding_length", U32, 8)
    g.key("llama.block_count", U32, 1).key("llama.attention.head_count", U32, 2)
    g.key("llama.attention.head_count_kv", U32, 1).key("llama.feed_forward_length", U32, 16)
    g.key("llama.vocab_size", U32, 16).key("llama.rope.freq_base", F32, 10000.0)
    g.key("llama.attention.layer_norm_rms_epsilon", F32, 1e-5).key("llama.context_length", U32, 64)
    g.key("tokenizer.ggml.bos_token_id", U32, 1).key("tokenizer.ggml.eos_token_id", U32, 2)
    g.f32_tensor("token_embd.weight", [8, 16]).f32_tensor("blk.0.attn_norm.weight", [8])
    g.f32_tensor("blk.0.attn_q.weight", [8, 8]).f32_tensor("blk.0.attn_k.weight", [8, 4])
    g.f32_tensor("blk.0.ffn_down.weight", [16, 8]).f32_tensor("output_norm.weight", [8])
    return g


def tiny_bloom():
    g = Gguf()
    g.key("general.architecture", STR, "bloom").key("bloom.embedding_length", U32, 8)
    g.key("bloom.block_count", U32, 1).key("bloom.attention.head_count", U32, 2)
    g.key("bloom.feed_forward_length", U32, 32).key("bloom.vocab_size", U32, 16)
    g.key("bloom.attention.layer_norm_epsilon", F32, 1e-5)
    g.f32_tensor("token_embd.weight", [8, 16]).f32_tensor("blk.0.attn_norm.weight", [8])
    g.f32_tensor("blk.0.attn_qkv.weight", [8, 24]).f32_tensor("blk.0.ffn_down.weight", [32, 8])
    return g


def quant_types():
    # (name, type id, values per block, bytes per block)
    layouts = [("f16", 1, 1, 2), ("bf16", 30, 1, 2), ("f64", 28, 1, 8), ("i8", 24, 1, 1),
               ("i16", 25, 1, 2), ("i32", 26, 1, 4), ("q8_0", 8, 32, 34), ("q4_0", 2, 32, 18),
               ("q4_1", 3, 32, 20), ("q5_0", 6, 32, 22), ("q5_1", 7, 32, 24),
               ("q4_k", 12, 256, 144), ("q6_k", 14, 256, 210)]
    g = Gguf()
    g.key("general.architecture", STR, "test").key("general.alignment", U32, 32)
    for name, tid, per_block, nbytes in layouts:
        n = per_block if per_block > 1 else 8
        size = n // per_block * nbytes
        # Scales small and finite: each 2-byte half written as 0x3c00 (1.0) where a scale sits.
        data = bytearray((i * 37 + tid) % 251 for i in range(size))
        if tid in (8, 2, 3, 6, 7):
            data[0:2] = b"\x00\x3c"
            if tid in (3, 7):
                data[2:4] = b"\x00\x3c"
        if tid == 12:
            data[0:4] = b"\x00\x3c\x00\x3c"
        if tid == 14:
            data[208:210] = b"\x00\x3c"
        if tid in (1, 30):
            data = b"".join(struct.pack("<H", 0x3c00 + i) for i in range(n))
        g.raw_tensor("t_" + name, [n], tid, bytes(data))
    return g


def every_value_type():
    g = Gguf(alignment=64)
    g.key("general.architecture", STR, "test").key("general.alignment", U32, 64)
    for t, v in [(U8, 200), (I8, -3), (U16, 60000), (I16, -300), (U32, 4000000000), (I32, -7),
                 (F32, 1.5), (BOOL, True), (U64, 2**63 + 5), (I64, -2**40), (F64, 1e-300)]:
        g.key("test.v%d" % t, t, v)
    g.key("test.str", STR, "héllo")
    g.key("test.ints", ARR, (I32, [1, -2, 3]))
    g.key("test.floats", ARR, (F64, [0.5, -1e10]))
    g.key("test.strs", ARR, (STR, ["a", "", "bc"]))
    g.key("test.nested", ARR, (ARR, [(U8, [1, 2]), (STR, ["x"])]))
    g.f32_tensor("t", [4, 2])
    return g


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


BYTE = bytes_to_unicode()
BYTE_TOKENS = [BYTE[b] for b in range(256)]
MERGES = [("H", "e"), ("l", "l"), ("He", "ll"), ("Ġ", "w"), ("o", "r"), ("Ġw", "or")]
MERGED = ["".join(m) for m in MERGES]
SPECIALS = ["<|endoftext|>", "<|im_start|>"]


def gguf_tokenizer(pre):
    g = Gguf()
    tokens = BYTE_TOKENS + MERGED + SPECIALS
    g.key("general.architecture", STR, "llama").key("tokenizer.ggml.model", STR, "gpt2")
    g.key("tokenizer.ggml.pre", STR, pre)
    g.key("tokenizer.ggml.tokens", ARR, (STR, tokens))
    g.key("tokenizer.ggml.token_type", ARR, (I32, [1] * (len(tokens) - 2) + [3, 3]))
    g.key("tokenizer.ggml.merges", ARR, (STR, ["%s %s" % m for m in MERGES]))
    g.key("tokenizer.ggml.bos_token_id", U32, len(tokens) - 1)
    g.key("tokenizer.ggml.eos_token_id", U32, len(tokens) - 2)
    g.key("tokenizer.ggml.add_bos_token", BOOL, True)
    g.key("tokenizer.chat_template", STR, "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    return g


def gguf_seeds():
    write("gguf", "llama.gguf", tiny_llama().bytes())
    write("gguf", "bloom.gguf", tiny_bloom().bytes())
    write("gguf", "quant.gguf", quant_types().bytes())
    write("gguf", "values.gguf", every_value_type().bytes())
    write("gguf", "tokenizer_gpt2.gguf", gguf_tokenizer("gpt-2").bytes())
    write("gguf", "tokenizer_llama3.gguf", gguf_tokenizer("llama3").bytes())
    g = tiny_llama()
    g.f32_tensor("rope_freqs.weight", [2]).f32_tensor("output.weight", [8, 16])
    g.key("llama.rope.scaling.type", STR, "linear").key("llama.rope.scaling.factor", F32, 2.0)
    write("gguf", "llama_scaled.gguf", g.bytes())


# --- safetensors ----------------------------------------------------------------------------
def safetensors(tensors, metadata=None, pad_to=8):
    header, data = {}, b""
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    if metadata is not None:
        header["__metadata__"] = metadata
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % pad_to)
    return struct.pack("<Q", len(h)) + h + data


def safetensors_seeds():
    f32 = struct.pack("<6f", 0, 1, -2, 3.5, 1e-3, -0.0)
    write("safetensors", "mixed.safetensors", safetensors([
        ("w", "F32", [2, 3], f32), ("b", "BF16", [4], struct.pack("<4H", 0x3f80, 0, 0xbf80, 0x4000)),
        ("h", "F16", [2], struct.pack("<2H", 0x3c00, 0xc000)), ("i", "I64", [2], struct.pack("<2q", -1, 7)),
        ("j", "I32", [1], struct.pack("<i", 5)), ("k", "I16", [1], struct.pack("<h", -5)),
        ("u", "U8", [3], b"\x01\x02\x03"), ("s", "I8", [1], b"\xff"), ("m", "BOOL", [2], b"\x00\x01"),
        ("d", "F64", [1], struct.pack("<d", 2.5))], {"format": "pt"}))
    write("safetensors", "empty.safetensors", safetensors([]))
    write("safetensors", "scalar_and_zero.safetensors", safetensors([
        ("scalar", "F32", [], struct.pack("<f", 4.0)), ("none", "F32", [0, 3], b"")]))


# --- JSON, config.json, tokenizer.json ------------------------------------------------------
def llama_config(**over):
    c = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 16,
         "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
         "num_attention_heads": 2, "num_key_value_heads": 1, "hidden_act": "silu",
         "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
         "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2}
    c.update(over)
    return c


def config_seeds():
    cfgs = {
        "llama.json": llama_config(),
        "llama3_scaling.json": llama_config(rope_scaling={
            "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}, eos_token_id=[2, 3], head_dim=4),
        "rope_parameters.json": llama_config(rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                              "rope_theta": 500000.0}),
        "qwen2.json": llama_config(architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                                   use_sliding_window=False, attention_bias=True),
        "bloom.json": {"architectures": ["BloomForCausalLM"], "model_type": "bloom",
                       "vocab_size": 16, "hidden_size": 8, "n_layer": 1, "n_head": 2,
                       "layer_norm_epsilon": 1e-5, "apply_residual_connection_post_layernorm": False,
                       "seq_length": 64, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3},
    }
    for name, c in cfgs.items():
        write("hf_config", name, json.dumps(c, indent=1))
        write("json", "config_" + name, json.dumps(c))


def tokenizer_json(pre_tokenizer, normalizer=None, post=None, added=True):
    vocab = {t: i for i, t in enumerate(BYTE_TOKENS + MERGED)}
    added_tokens = [{"id": len(vocab) + i, "content": s, "single_word": False, "lstrip": False,
                     "rstrip": False, "normalized": False, "special": True}
                    for i, s in enumerate(SPECIALS)] if added else []
    return json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added_tokens,
        "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [[a, b] for a, b in MERGES]}},
        ensure_ascii=False, separators=(",", ":"))


def tokenizer_seeds():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    split = {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
             "behavior": "Isolated", "invert": False}
    write("tokenizer", "gpt2.json", tokenizer_json(byte_level))
    write("tokenizer", "llama3.json", tokenizer_json(
        {"type": "Sequence", "pretokenizers": [split, dict(byte_level, use_regex=False)]},
        post={"type": "TemplateProcessing",
              "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                         {"Sequence": {"id": "A", "type_id": 0}}],
              "pair": [], "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [263],
                                                            "tokens": ["<|im_start|>"]}}}))
    write("tokenizer", "digits_nfc.json", tokenizer_json(
        {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                               dict(byte_level, add_prefix_space=True)]},
        normalizer={"type": "NFC"}, post=byte_level, added=False))


def json_seeds():
    for name, text in {
        "scalars.json": '[null, true, false, 0, -0, 1.5e300, -2.5E-3, 9223372036854775807, '
                        '-9223372036854775808, 18446744073709551616, 1e400]',
        "strings.json": '{"a": "\\u00e9\\ud83d\\ude00\\n\\t\\"\\\\\\/", "": "", "k": "ü€"}',
        "nested.json": '{"x": [[[[{}]]], {"y": {"z": []}}], "x": 3}',
        "ws.json": ' \t\r\n{ "a" : [ 1 , 2 ] } \n',
    }.items():
        write("json", name, text)


def main():
    gguf_seeds()
    safetensors_seeds()
    config_seeds()
    tokenizer_seeds()
    json_seeds()
    n = sum(len(fs) for _, _, fs in os.walk(OUT))
    print("wrote %d seed files under %s" % (n, OUT), file=sys.stderr)


if __name__ == "__main__":
    main()
