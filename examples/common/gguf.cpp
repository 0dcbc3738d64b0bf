#include "common/gguf.h"

#include "common/mapped_file.h"

#include <slowed/cpu/parallel.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/torch.h>


#include <cerrno>
#include <cstring>
#include <limits>

namespace slowed_examples {

// ---------------------------------------------------------------------------------------------
// Type tables.

const char* gguf_type_name(GgufType t) {
  switch (t) {
    case GgufType::UINT8: return "UINT8";
    case GgufType::INT8: return "INT8";
    case GgufType::UINT16: return "UINT16";
    case GgufType::INT16: return "INT16";
    case GgufType::UINT32: return "UINT32";
    case GgufType::INT32: return "INT32";
    case GgufType::FLOAT32: return "FLOAT32";
    case GgufType::BOOL: return "BOOL";
    case GgufType::STRING: return "STRING";
    case GgufType::ARRAY: return "ARRAY";
    case GgufType::UINT64: return "UINT64";
    case GgufType::INT64: return "INT64";
    case GgufType::FLOAT64: return "FLOAT64";
  }
  return "UNKNOWN";
}

namespace {

struct TypeRow {
  GgmlType type;
  const char* name;
  int64_t block;  // values per block
  int64_t bytes;  // bytes per block
  bool supported;
};

// Block layouts from ggml (GGML_QUANT_SIZES in gguf-py); QK_K = 256.
constexpr TypeRow kTypes[] = {
    {GgmlType::F32, "F32", 1, 4, true},
    {GgmlType::F16, "F16", 1, 2, true},
    {GgmlType::Q4_0, "Q4_0", 32, 18, true},
    {GgmlType::Q4_1, "Q4_1", 32, 20, true},
    {GgmlType::Q5_0, "Q5_0", 32, 22, true},
    {GgmlType::Q5_1, "Q5_1", 32, 24, true},
    {GgmlType::Q8_0, "Q8_0", 32, 34, true},
    {GgmlType::Q8_1, "Q8_1", 32, 40, false},
    {GgmlType::Q2_K, "Q2_K", 256, 84, false},
    {GgmlType::Q3_K, "Q3_K", 256, 110, false},
    {GgmlType::Q4_K, "Q4_K", 256, 144, true},
    {GgmlType::Q5_K, "Q5_K", 256, 176, false},
    {GgmlType::Q6_K, "Q6_K", 256, 210, true},
    {GgmlType::Q8_K, "Q8_K", 256, 292, false},
    {GgmlType::IQ2_XXS, "IQ2_XXS", 256, 66, false},
    {GgmlType::IQ2_XS, "IQ2_XS", 256, 74, false},
    {GgmlType::IQ3_XXS, "IQ3_XXS", 256, 98, false},
    {GgmlType::IQ1_S, "IQ1_S", 256, 50, false},
    {GgmlType::IQ4_NL, "IQ4_NL", 32, 18, false},
    {GgmlType::IQ3_S, "IQ3_S", 256, 110, false},
    {GgmlType::IQ2_S, "IQ2_S", 256, 82, false},
    {GgmlType::IQ4_XS, "IQ4_XS", 256, 136, false},
    {GgmlType::I8, "I8", 1, 1, true},
    {GgmlType::I16, "I16", 1, 2, true},
    {GgmlType::I32, "I32", 1, 4, true},
    {GgmlType::I64, "I64", 1, 8, false},
    {GgmlType::F64, "F64", 1, 8, true},
    {GgmlType::IQ1_M, "IQ1_M", 256, 56, false},
    {GgmlType::BF16, "BF16", 1, 2, true},
    {GgmlType::TQ1_0, "TQ1_0", 256, 54, false},
    {GgmlType::TQ2_0, "TQ2_0", 256, 66, false},
    {GgmlType::MXFP4, "MXFP4", 32, 17, false},
};

const TypeRow* find_type(GgmlType t) {
  for (const auto& r : kTypes)
    if (r.type == t) return &r;
  return nullptr;
}

std::string supported_list() {
  std::string s;
  for (const auto& r : kTypes)
    if (r.supported) s += (s.empty() ? "" : ", ") + std::string(r.name);
  return s;
}

inline float fp16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(h);
}

inline float bf16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// ---- Block dequantizers (one block of `block` values each), as in ggml-quants.c. ----

// Q8_0: fp16 d, int8 q[32]; x = d * q.
void deq_q8_0(const uint8_t* b, float* y) {
  const float d = fp16(b);
  const int8_t* q = reinterpret_cast<const int8_t*>(b + 2);
  for (int j = 0; j < 32; ++j) y[j] = d * q[j];
}

// Q4_0: fp16 d, 16 bytes of nibbles; low nibbles are values 0..15, high nibbles 16..31;
// x = d * (nibble - 8).
void deq_q4_0(const uint8_t* b, float* y) {
  const float d = fp16(b);
  const uint8_t* qs = b + 2;
  for (int j = 0; j < 16; ++j) {
    y[j] = d * (static_cast<int>(qs[j] & 0x0F) - 8);
    y[j + 16] = d * (static_cast<int>(qs[j] >> 4) - 8);
  }
}

// Q4_1: fp16 d, fp16 m, 16 bytes of nibbles; x = d * nibble + m.
void deq_q4_1(const uint8_t* b, float* y) {
  const float d = fp16(b);
  const float m = fp16(b + 2);
  const uint8_t* qs = b + 4;
  for (int j = 0; j < 16; ++j) {
    y[j] = d * (qs[j] & 0x0F) + m;
    y[j + 16] = d * (qs[j] >> 4) + m;
  }
}

// Q5_0: fp16 d, uint32 qh (bit j = 5th bit of value j), 16 bytes of nibbles;
// x = d * (q5 - 16).
void deq_q5_0(const uint8_t* b, float* y) {
  const float d = fp16(b);
  uint32_t qh;
  std::memcpy(&qh, b + 2, 4);
  const uint8_t* qs = b + 6;
  for (int j = 0; j < 16; ++j) {
    const int x0 = (qs[j] & 0x0F) | (((qh >> j) & 1) << 4);
    const int x1 = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
    y[j] = d * (x0 - 16);
    y[j + 16] = d * (x1 - 16);
  }
}

// Q5_1: fp16 d, fp16 m, uint32 qh, 16 bytes of nibbles; x = d * q5 + m.
void deq_q5_1(const uint8_t* b, float* y) {
  const float d = fp16(b);
  const float m = fp16(b + 2);
  uint32_t qh;
  std::memcpy(&qh, b + 4, 4);
  const uint8_t* qs = b + 8;
  for (int j = 0; j < 16; ++j) {
    const int x0 = (qs[j] & 0x0F) | (((qh >> j) & 1) << 4);
    const int x1 = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
    y[j] = d * x0 + m;
    y[j + 16] = d * x1 + m;
  }
}

// Q4_K scales: 8 sub-blocks, each a 6-bit scale and a 6-bit min packed into 12 bytes.
inline void scale_min_k4(int j, const uint8_t* q, uint8_t* d, uint8_t* m) {
  if (j < 4) {
    *d = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *d = (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// Q4_K: fp16 d, fp16 dmin, scales[12], qs[128]; 8 sub-blocks of 32:
// x = d * sc * nibble - dmin * m.
void deq_q4_k(const uint8_t* b, float* y) {
  const float d = fp16(b);
  const float dmin = fp16(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* q = b + 16;
  int is = 0;
  for (int j = 0; j < 256; j += 64) {
    uint8_t sc, m;
    scale_min_k4(is + 0, scales, &sc, &m);
    const float d1 = d * sc, m1 = dmin * m;
    scale_min_k4(is + 1, scales, &sc, &m);
    const float d2 = d * sc, m2 = dmin * m;
    for (int l = 0; l < 32; ++l) *y++ = d1 * (q[l] & 0x0F) - m1;
    for (int l = 0; l < 32; ++l) *y++ = d2 * (q[l] >> 4) - m2;
    q += 32;
    is += 2;
  }
}

// Q6_K: ql[128] (low 4 bits), qh[64] (high 2 bits), int8 scales[16], fp16 d;
// x = d * scale * (q6 - 32), 16 sub-blocks of 16.
void deq_q6_k(const uint8_t* b, float* y) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = fp16(b + 208);
  for (int n = 0; n < 256; n += 128) {
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q1 = static_cast<int>((ql[l] & 0x0F) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = static_cast<int>((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = static_cast<int>((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = static_cast<int>((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      y[l + 0] = d * sc[is + 0] * q1;
      y[l + 32] = d * sc[is + 2] * q2;
      y[l + 64] = d * sc[is + 4] * q3;
      y[l + 96] = d * sc[is + 6] * q4;
    }
    y += 128;
    ql += 64;
    qh += 32;
    sc += 8;
  }
}

template <typename T>
void deq_plain(const uint8_t* b, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    T v;
    std::memcpy(&v, b + i * sizeof(T), sizeof(T));
    y[i] = static_cast<float>(v);
  }
}

}  // namespace

std::string ggml_type_name(GgmlType t) {
  const TypeRow* r = find_type(t);
  return r ? std::string(r->name) : "unknown(" + std::to_string(static_cast<uint32_t>(t)) + ")";
}

bool ggml_type_supported(GgmlType t) {
  const TypeRow* r = find_type(t);
  return r != nullptr && r->supported;
}

std::pair<int64_t, int64_t> ggml_block_layout(GgmlType type) {
  const TypeRow* r = find_type(type);
  TORCH_CHECK(r != nullptr, "ggml type id ", static_cast<uint32_t>(type), " is unknown");
  return {r->block, r->bytes};
}

void ggml_dequantize(GgmlType type, const uint8_t* src, float* dst, int64_t n) {
  const TypeRow* r = find_type(type);
  TORCH_CHECK(r != nullptr && r->supported, "dequantize: quantization type ",
              ggml_type_name(type), " is not supported (supported: ", supported_list(), ")");
  TORCH_CHECK(n % r->block == 0, "dequantize: ", n, " values is not a multiple of the ",
              r->name, " block size ", r->block);
  const int64_t blocks = n / r->block;
  const int64_t bs = r->block, bb = r->bytes;
  // Elementwise types: contiguous conversion in chunks; block types: one block per step.
  const int64_t grain = bs == 1 ? 1 << 16 : 256;
  slowed::cpu::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    const uint8_t* s = src + begin * bb;
    float* y = dst + begin * bs;
    const int64_t count = end - begin;
    switch (type) {
      case GgmlType::F32: std::memcpy(y, s, count * 4); return;
      case GgmlType::F64: deq_plain<double>(s, y, count); return;
      case GgmlType::I8: deq_plain<int8_t>(s, y, count); return;
      case GgmlType::I16: deq_plain<int16_t>(s, y, count); return;
      case GgmlType::I32: deq_plain<int32_t>(s, y, count); return;
      case GgmlType::F16:
        for (int64_t i = 0; i < count; ++i) y[i] = fp16(s + 2 * i);
        return;
      case GgmlType::BF16:
        for (int64_t i = 0; i < count; ++i) y[i] = bf16(s + 2 * i);
        return;
      default: break;
    }
    void (*fn)(const uint8_t*, float*) = nullptr;
    switch (type) {
      case GgmlType::Q8_0: fn = deq_q8_0; break;
      case GgmlType::Q4_0: fn = deq_q4_0; break;
      case GgmlType::Q4_1: fn = deq_q4_1; break;
      case GgmlType::Q5_0: fn = deq_q5_0; break;
      case GgmlType::Q5_1: fn = deq_q5_1; break;
      case GgmlType::Q4_K: fn = deq_q4_k; break;
      case GgmlType::Q6_K: fn = deq_q6_k; break;
      default: break;
    }
    for (int64_t i = 0; i < count; ++i) fn(s + i * bb, y + i * bs);
  });
}

// ---------------------------------------------------------------------------------------------
// GgufValue / GgufTensorInfo.

bool GgufValue::is_integer() const {
  switch (type) {
    case GgufType::UINT8: case GgufType::INT8: case GgufType::UINT16: case GgufType::INT16:
    case GgufType::UINT32: case GgufType::INT32: case GgufType::UINT64: case GgufType::INT64:
      return true;
    default: return false;
  }
}

int64_t GgufTensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : ggml_dims) n *= d;
  return n;
}

// ---------------------------------------------------------------------------------------------
// File mapping and header parsing.


namespace {

class Reader {
 public:
  Reader(const uint8_t* data, size_t size, const std::string& path)
      : data_(data), size_(size), path_(path) {}

  size_t pos() const { return pos_; }

  void need(uint64_t n, const std::string& what) {
    TORCH_CHECK(n <= size_ && pos_ <= size_ - n, "GGUF file '", path_,
                "': truncated file: reading ", what, " needs ", n, " bytes at offset ", pos_,
                ", file size is ", size_);
  }
  template <typename T>
  T read(const std::string& what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, data_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  std::string read_string(const std::string& what) {
    const uint64_t n = read<uint64_t>(what + " (string length)");
    need(n, what);
    std::string s(reinterpret_cast<const char*>(data_ + pos_), n);
    pos_ += n;
    return s;
  }

  /// The fewest bytes one value of `type` takes in the file.
  static uint64_t min_value_bytes(GgufType type) {
    switch (type) {
      case GgufType::UINT8: case GgufType::INT8: case GgufType::BOOL: return 1;
      case GgufType::UINT16: case GgufType::INT16: return 2;
      case GgufType::UINT32: case GgufType::INT32: case GgufType::FLOAT32: return 4;
      case GgufType::ARRAY: return 12;  // element type and length
      default: return 8;                // 64-bit values; a string's length
    }
  }

  GgufValue read_value(GgufType type, const std::string& key, int depth) {
    GgufValue v;
    v.type = type;
    const std::string what = "value of key '" + key + "'";
    switch (type) {
      case GgufType::UINT8: v.u = read<uint8_t>(what); break;
      case GgufType::INT8: v.i = read<int8_t>(what); break;
      case GgufType::UINT16: v.u = read<uint16_t>(what); break;
      case GgufType::INT16: v.i = read<int16_t>(what); break;
      case GgufType::UINT32: v.u = read<uint32_t>(what); break;
      case GgufType::INT32: v.i = read<int32_t>(what); break;
      case GgufType::UINT64: v.u = read<uint64_t>(what); break;
      case GgufType::INT64: v.i = read<int64_t>(what); break;
      case GgufType::FLOAT32: v.f = read<float>(what); break;
      case GgufType::FLOAT64: v.f = read<double>(what); break;
      case GgufType::BOOL: {
        const uint8_t b = read<uint8_t>(what);
        TORCH_CHECK(b <= 1, "GGUF file '", path_, "': key '", key,
                    "': BOOL must be 0 or 1, got ", static_cast<int>(b));
        v.u = b;
        break;
      }
      case GgufType::STRING: v.s = read_string(what); break;
      case GgufType::ARRAY: {
        TORCH_CHECK(depth < 16, "GGUF file '", path_, "': key '", key,
                    "': arrays nested deeper than 16");
        const uint32_t et = read<uint32_t>(what + " (array element type)");
        TORCH_CHECK(et <= static_cast<uint32_t>(GgufType::FLOAT64), "GGUF file '", path_,
                    "': key '", key, "': unknown array element type ", et);
        v.elem_type = static_cast<GgufType>(et);
        const uint64_t n = read<uint64_t>(what + " (array length)");
        // Each element takes at least min_bytes of the file: a longer array is corruption, and
        // refusing it before reserve() bounds the memory by the file size.
        const uint64_t min_bytes = min_value_bytes(v.elem_type);
        TORCH_CHECK(n <= size_ / min_bytes, "GGUF file '", path_, "': key '", key,
                    "': array of ", n, " ", gguf_type_name(v.elem_type),
                    " elements cannot fit in a file of ", size_, " bytes");
        need(n * min_bytes, what + " (" + std::to_string(n) + " array elements)");
        v.elems.reserve(n);
        for (uint64_t i = 0; i < n; ++i) v.elems.push_back(read_value(v.elem_type, key, depth + 1));
        break;
      }
      default:
        TORCH_CHECK(false, "GGUF file '", path_, "': key '", key, "': unknown value type ",
                    static_cast<uint32_t>(type));
    }
    return v;
  }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
  const std::string& path_;
};

}  // namespace

GgufFile GgufFile::open(const std::string& path) {
  GgufFile f;
  f.path_ = path;
  const auto mapping = map_file(path, "GGUF file");
  f.mapping_ = mapping;

  Reader r(mapping->data, mapping->size, path);
  TORCH_CHECK(mapping->size >= 4, "GGUF file '", path, "': bad magic: file has ",
              mapping->size, " bytes, expected at least the 4-byte magic \"GGUF\"");
  const char* magic = reinterpret_cast<const char*>(mapping->data);
  if (std::memcmp(magic, "GGUF", 4) != 0) {
    std::string got;
    for (int i = 0; i < 4; ++i) {
      const unsigned char c = static_cast<unsigned char>(magic[i]);
      char buf[8];
      std::snprintf(buf, sizeof buf, (c >= 32 && c < 127) ? "%c" : "\\x%02x", c);
      got += buf;
    }
    TORCH_CHECK(false, "GGUF file '", path, "': bad magic: expected \"GGUF\", got \"", got, "\"");
  }
  r.read<uint32_t>("magic");
  f.version_ = r.read<uint32_t>("version");
  if (f.version_ == 0x02000000u || f.version_ == 0x03000000u) {
    TORCH_CHECK(false, "GGUF file '", path,
                "': big-endian GGUF files are not supported (version field reads ",
                f.version_, ")");
  }
  TORCH_CHECK(f.version_ == 2 || f.version_ == 3, "GGUF file '", path,
              "': unsupported version ", f.version_, " (expected 2 or 3)");
  const uint64_t n_tensors = r.read<uint64_t>("tensor count");
  const uint64_t n_kv = r.read<uint64_t>("metadata count");
  // A key-value pair takes at least 13 bytes (key length, type, one byte of value), a tensor
  // info at least 32 (name length, dims count, one dim, type, offset).
  TORCH_CHECK(n_kv <= mapping->size / 13 && n_tensors <= mapping->size / 32, "GGUF file '", path,
              "': truncated file: ", n_kv, " metadata entries and ", n_tensors,
              " tensor infos cannot fit in ", mapping->size, " bytes");
  r.need(n_kv * 13 + n_tensors * 32, "metadata (" + std::to_string(n_kv) + " entries) and "
         "tensor infos (" + std::to_string(n_tensors) + " entries)");

  for (uint64_t k = 0; k < n_kv; ++k) {
    std::string key = r.read_string("metadata key #" + std::to_string(k));
    const uint32_t t = r.read<uint32_t>("type of key '" + key + "'");
    TORCH_CHECK(t <= static_cast<uint32_t>(GgufType::FLOAT64), "GGUF file '", path, "': key '",
                key, "': unknown value type ", t);
    GgufValue v = r.read_value(static_cast<GgufType>(t), key, 0);
    if (!f.meta_.count(key)) f.key_order_.push_back(key);
    f.meta_[key] = std::move(v);
  }

  if (f.has("general.alignment")) {
    const int64_t a = f.get_int("general.alignment");
    TORCH_CHECK(a > 0 && (a & (a - 1)) == 0 && a <= (int64_t(1) << 30), "GGUF file '", path,
                "': general.alignment must be a power of two in [1, 2^30], got ", a);
    f.alignment_ = static_cast<uint64_t>(a);
  }

  for (uint64_t t = 0; t < n_tensors; ++t) {
    GgufTensorInfo info;
    info.name = r.read_string("tensor info #" + std::to_string(t) + " name");
    const uint32_t nd = r.read<uint32_t>("dims of tensor '" + info.name + "'");
    TORCH_CHECK(nd >= 1 && nd <= 8, "GGUF file '", path, "': tensor '", info.name,
                "': expected 1..8 dimensions, got ", nd);
    int64_t numel = 1;
    for (uint32_t d = 0; d < nd; ++d) {
      const uint64_t dim = r.read<uint64_t>("dims of tensor '" + info.name + "'");
      TORCH_CHECK(dim < (uint64_t(1) << 40), "GGUF file '", path, "': tensor '", info.name,
                  "': dimension ", dim, " is implausible");
      info.ggml_dims.push_back(static_cast<int64_t>(dim));
      TORCH_CHECK(!__builtin_mul_overflow(numel, static_cast<int64_t>(dim), &numel),
                  "GGUF file '", path, "': tensor '", info.name, "': the element count of shape ",
                  torch::IntArrayRef(info.ggml_dims), " (ggml order) overflows int64");
    }
    info.shape.assign(info.ggml_dims.rbegin(), info.ggml_dims.rend());
    const uint32_t type = r.read<uint32_t>("type of tensor '" + info.name + "'");
    info.type = static_cast<GgmlType>(type);
    const TypeRow* row = find_type(info.type);
    TORCH_CHECK(row != nullptr, "GGUF file '", path, "': tensor '", info.name,
                "': unknown quantization type id ", type, " (supported: ", supported_list(), ")");
    info.offset = r.read<uint64_t>("offset of tensor '" + info.name + "'");
    TORCH_CHECK(info.ggml_dims[0] % row->block == 0, "GGUF file '", path, "': tensor '",
                info.name, "': inner dimension ", info.ggml_dims[0],
                " is not a multiple of the ", row->name, " block size ", row->block);
    int64_t nbytes = 0;
    TORCH_CHECK(!__builtin_mul_overflow(numel / row->block, row->bytes, &nbytes), "GGUF file '",
                path, "': tensor '", info.name, "': the byte size of ", numel, " ", row->name,
                " values overflows int64");
    info.nbytes = static_cast<uint64_t>(nbytes);
    TORCH_CHECK(!f.tensor_index_.count(info.name), "GGUF file '", path, "': tensor '",
                info.name, "' listed twice");
    f.tensor_index_[info.name] = f.tensors_.size();
    f.tensors_.push_back(std::move(info));
  }

  const uint64_t pos = r.pos();
  f.data_offset_ = (pos + f.alignment_ - 1) / f.alignment_ * f.alignment_;
  const uint64_t size = mapping->size;
  // As llama.cpp's reader requires: the tensors tile the data section in file order, each at
  // the previous one's end rounded up to the alignment. So data cannot overlap, be unaligned,
  // shifted or out of order, and each tensor's byte size (from its type and shape) is exactly
  // the room it has: a changed type id or shape moves every later offset.
  uint64_t expected = 0;
  for (const auto& info : f.tensors_) {
    TORCH_CHECK(info.offset == expected, "GGUF file '", path, "': tensor '", info.name,
                "': data offset ", info.offset, ", expected ", expected,
                " (tensors follow each other in file order, each at a multiple of the alignment ",
                f.alignment_, " after the previous one's end)");
    const uint64_t begin = f.data_offset_ + info.offset;
    TORCH_CHECK(info.offset <= size && begin <= size && info.nbytes <= size - begin,
                "GGUF file '", path, "': truncated file: tensor '", info.name, "' (",
                ggml_type_name(info.type), ", ", info.nbytes, " bytes) spans bytes [", begin, ", ",
                begin + info.nbytes, ") but the file has ", size, " bytes");
    expected = (info.offset + info.nbytes + f.alignment_ - 1) / f.alignment_ * f.alignment_;
  }
  if (!f.tensors_.empty()) {
    TORCH_CHECK(size - f.data_offset_ <= expected, "GGUF file '", path, "': the data section has ",
                size - f.data_offset_, " bytes but its tensors (to the last one's padded end) take ",
                expected, " (extra data, or a tensor's type or shape changed)");
  }
  return f;
}

// ---------------------------------------------------------------------------------------------
// Metadata accessors.

bool GgufFile::has(const std::string& key) const { return meta_.count(key) != 0; }

std::vector<std::string> GgufFile::keys() const { return key_order_; }

const GgufValue& GgufFile::value(const std::string& key) const {
  auto it = meta_.find(key);
  TORCH_CHECK(it != meta_.end(), "GGUF file '", path_, "': metadata key '", key, "' not found");
  return it->second;
}

namespace {

int64_t as_int(const GgufValue& v, const std::string& path, const std::string& key) {
  switch (v.type) {
    case GgufType::INT8: case GgufType::INT16: case GgufType::INT32: case GgufType::INT64:
      return v.i;
    case GgufType::UINT8: case GgufType::UINT16: case GgufType::UINT32: case GgufType::UINT64:
      TORCH_CHECK(v.u <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()),
                  "GGUF file '", path, "': key '", key, "': value ", v.u, " overflows int64");
      return static_cast<int64_t>(v.u);
    default:
      TORCH_CHECK(false, "GGUF file '", path, "': key '", key,
                  "': expected an integer, got ", gguf_type_name(v.type));
  }
}

double as_float(const GgufValue& v, const std::string& path, const std::string& key) {
  if (v.is_float()) return v.f;
  if (v.is_integer()) return static_cast<double>(as_int(v, path, key));
  TORCH_CHECK(false, "GGUF file '", path, "': key '", key, "': expected a float, got ",
              gguf_type_name(v.type));
}

const GgufValue& expect_array(const GgufValue& v, const std::string& path,
                              const std::string& key, const char* what) {
  TORCH_CHECK(v.type == GgufType::ARRAY, "GGUF file '", path, "': key '", key,
              "': expected an array of ", what, ", got ", gguf_type_name(v.type));
  return v;
}

// The elements of an array value, each through `convert` (which checks its type).
template <typename T, typename Convert>
std::vector<T> map_elems(const GgufValue& array, Convert convert) {
  std::vector<T> out;
  out.reserve(array.elems.size());
  for (const auto& e : array.elems) out.push_back(convert(e));
  return out;
}

}  // namespace

std::string GgufFile::get_string(const std::string& key) const {
  const GgufValue& v = value(key);
  TORCH_CHECK(v.type == GgufType::STRING, "GGUF file '", path_, "': key '", key,
              "': expected STRING, got ", gguf_type_name(v.type));
  return v.s;
}

int64_t GgufFile::get_int(const std::string& key) const { return as_int(value(key), path_, key); }

double GgufFile::get_float(const std::string& key) const {
  return as_float(value(key), path_, key);
}

bool GgufFile::get_bool(const std::string& key) const {
  const GgufValue& v = value(key);
  TORCH_CHECK(v.type == GgufType::BOOL, "GGUF file '", path_, "': key '", key,
              "': expected BOOL, got ", gguf_type_name(v.type));
  return v.u != 0;
}

std::vector<std::string> GgufFile::get_string_array(const std::string& key) const {
  const GgufValue& v = expect_array(value(key), path_, key, "STRING");
  TORCH_CHECK(v.elem_type == GgufType::STRING, "GGUF file '", path_, "': key '", key,
              "': expected an array of STRING, got an array of ", gguf_type_name(v.elem_type));
  return map_elems<std::string>(v, [](const GgufValue& e) { return e.s; });
}

std::vector<int64_t> GgufFile::get_int_array(const std::string& key) const {
  const GgufValue& v = expect_array(value(key), path_, key, "integers");
  return map_elems<int64_t>(v, [&](const GgufValue& e) { return as_int(e, path_, key); });
}

std::vector<double> GgufFile::get_float_array(const std::string& key) const {
  const GgufValue& v = expect_array(value(key), path_, key, "floats");
  return map_elems<double>(v, [&](const GgufValue& e) { return as_float(e, path_, key); });
}

int64_t GgufFile::get_int_or(const std::string& key, int64_t fallback) const {
  return has(key) ? get_int(key) : fallback;
}
double GgufFile::get_float_or(const std::string& key, double fallback) const {
  return has(key) ? get_float(key) : fallback;
}
std::string GgufFile::get_string_or(const std::string& key, const std::string& fallback) const {
  return has(key) ? get_string(key) : fallback;
}

// ---------------------------------------------------------------------------------------------
// Tensors.

std::vector<std::string> GgufFile::tensor_names() const {
  std::vector<std::string> out;
  out.reserve(tensors_.size());
  for (const auto& t : tensors_) out.push_back(t.name);
  return out;
}

bool GgufFile::has_tensor(const std::string& name) const { return tensor_index_.count(name) != 0; }

const GgufTensorInfo& GgufFile::tensor_info(const std::string& name) const {
  auto it = tensor_index_.find(name);
  TORCH_CHECK(it != tensor_index_.end(), "GGUF file '", path_, "': tensor '", name,
              "' not found (the file has ", tensors_.size(), " tensors)");
  return tensors_[it->second];
}

torch::Tensor GgufFile::raw_bytes(const std::string& name) const {
  const GgufTensorInfo& info = tensor_info(name);
  const uint8_t* p = mapping_->data + data_offset_ + info.offset;
  auto keep = mapping_;
  return torch::from_blob(const_cast<uint8_t*>(p), {static_cast<int64_t>(info.nbytes)},
                          [keep](void*) {}, torch::kUInt8);
}

torch::Tensor GgufFile::tensor(const std::string& name) const {
  const GgufTensorInfo& info = tensor_info(name);
  TORCH_CHECK(ggml_type_supported(info.type), "GGUF file '", path_, "': tensor '", name,
              "': quantization type ", ggml_type_name(info.type),
              " is not supported (supported: ", supported_list(), ")");
  torch::Tensor out = torch::empty(info.shape, torch::kFloat32);
  ggml_dequantize(info.type, mapping_->data + data_offset_ + info.offset,
                  out.data_ptr<float>(), info.numel());
  return out;
}

}  // namespace slowed_examples
