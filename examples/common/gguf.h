#pragma once

// A GGUF (v2 and v3) reader: header, metadata of every value type (arrays and nested arrays
// included), tensor infos, general.alignment, and the tensor data memory-mapped read-only.
// tensor() dequantizes to float32 (F32, F16, BF16, F64, I8/I16/I32, Q8_0, Q4_0, Q4_1, Q5_0,
// Q5_1, Q4_K, Q6_K), with the shape in PyTorch order (GGUF lists the innermost dimension
// first; we reverse it).
//
// Errors are c10::Error naming the file and the key or tensor, with expected vs got: missing
// file, bad magic, unsupported version, truncated header or tensor data past the end of the
// file, unknown or unsupported quantization type, missing key, wrong value type.
//
// Example:
//   auto f = slowed_examples::GgufFile::open("SmolLM2-135M-Instruct.Q4_1.gguf");
//   std::string arch = f.get_string("general.architecture");           // "llama"
//   int64_t layers = f.get_int(arch + ".block_count");                  // 30
//   auto tokens = f.get_string_array("tokenizer.ggml.tokens");
//   torch::Tensor w = f.tensor("blk.0.attn_q.weight");                  // [576, 576] float32

#include <torch/types.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace slowed_examples {

struct MappedFile;

/// GGUF metadata value types (gguf_type in ggml).
enum class GgufType : uint32_t {
  UINT8 = 0, INT8 = 1, UINT16 = 2, INT16 = 3, UINT32 = 4, INT32 = 5, FLOAT32 = 6, BOOL = 7,
  STRING = 8, ARRAY = 9, UINT64 = 10, INT64 = 11, FLOAT64 = 12,
};
const char* gguf_type_name(GgufType t);

/// ggml tensor types (ggml_type); the ids are fixed by the file format.
enum class GgmlType : uint32_t {
  F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q8_1 = 9, Q2_K = 10,
  Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15, IQ2_XXS = 16, IQ2_XS = 17,
  IQ3_XXS = 18, IQ1_S = 19, IQ4_NL = 20, IQ3_S = 21, IQ2_S = 22, IQ4_XS = 23, I8 = 24,
  I16 = 25, I32 = 26, I64 = 27, F64 = 28, IQ1_M = 29, BF16 = 30, TQ1_0 = 34, TQ2_0 = 35,
  MXFP4 = 39,
};
/// "Q4_1" etc.; "unknown(<id>)" for ids this reader does not know.
std::string ggml_type_name(GgmlType t);
/// Whether GgufFile::tensor() can dequantize this type.
bool ggml_type_supported(GgmlType t);

/// One metadata value. Arrays hold their elements (possibly arrays themselves).
struct GgufValue {
  GgufType type = GgufType::UINT8;
  uint64_t u = 0;  // UINT8/16/32/64, BOOL
  int64_t i = 0;   // INT8/16/32/64
  double f = 0;    // FLOAT32/64
  std::string s;   // STRING
  GgufType elem_type = GgufType::UINT8;  // ARRAY
  std::vector<GgufValue> elems;          // ARRAY
  bool is_integer() const;
  bool is_float() const { return type == GgufType::FLOAT32 || type == GgufType::FLOAT64; }
};

struct GgufTensorInfo {
  std::string name;
  std::vector<int64_t> ggml_dims;  // as stored: innermost first
  std::vector<int64_t> shape;      // PyTorch order: reversed ggml_dims
  GgmlType type = GgmlType::F32;
  uint64_t offset = 0;  // relative to the start of the data section
  uint64_t nbytes = 0;
  int64_t numel() const;
};

class GgufFile {
 public:
  /// Opens and validates a file: header, metadata, tensor infos, every tensor's data inside
  /// the file. Tensor data are memory-mapped, read lazily by tensor().
  static GgufFile open(const std::string& path);

  const std::string& path() const { return path_; }
  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  uint64_t data_offset() const { return data_offset_; }

  // Metadata.
  bool has(const std::string& key) const;
  /// Keys in file order.
  std::vector<std::string> keys() const;
  /// The raw value; throws naming the key when missing.
  const GgufValue& value(const std::string& key) const;
  std::string get_string(const std::string& key) const;
  /// Any integer type (UINT64 above INT64_MAX is an error).
  int64_t get_int(const std::string& key) const;
  /// FLOAT32/FLOAT64 (integers are accepted too).
  double get_float(const std::string& key) const;
  bool get_bool(const std::string& key) const;
  std::vector<std::string> get_string_array(const std::string& key) const;
  std::vector<int64_t> get_int_array(const std::string& key) const;
  std::vector<double> get_float_array(const std::string& key) const;
  /// Convenience: value when present, else fallback (wrong type still throws).
  int64_t get_int_or(const std::string& key, int64_t fallback) const;
  double get_float_or(const std::string& key, double fallback) const;
  std::string get_string_or(const std::string& key, const std::string& fallback) const;

  // Tensors.
  std::vector<std::string> tensor_names() const;
  bool has_tensor(const std::string& name) const;
  const GgufTensorInfo& tensor_info(const std::string& name) const;
  /// Dequantized float32 copy on the CPU, shape in PyTorch order.
  torch::Tensor tensor(const std::string& name) const;
  /// The stored bytes (still quantized), as a uint8 tensor viewing the mapping.
  torch::Tensor raw_bytes(const std::string& name) const;

 private:
  std::string path_;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  uint64_t data_offset_ = 0;
  std::vector<std::string> key_order_;
  std::map<std::string, GgufValue> meta_;
  std::vector<GgufTensorInfo> tensors_;
  std::map<std::string, size_t> tensor_index_;
  std::shared_ptr<const MappedFile> mapping_;
};

/// Dequantizes `n` values of type `type` from `src` (n a multiple of the type's block size)
/// into `dst`. Exposed for tests; throws for unsupported types.
void ggml_dequantize(GgmlType type, const uint8_t* src, float* dst, int64_t n);
/// Block size (values per block) and bytes per block; throws for unknown types.
std::pair<int64_t, int64_t> ggml_block_layout(GgmlType type);

}  // namespace slowed_examples
