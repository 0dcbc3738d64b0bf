#include "common/safetensors.h"

#include "common/mapped_file.h"

#include "common/json.h"

#include <c10/util/Exception.h>
#include <torch/torch.h>


#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>

namespace slowed_examples {

namespace fs = std::filesystem;


namespace {

struct DtypeRow {
  const char* name;
  torch::Dtype dtype;
  int64_t bytes;
};
constexpr DtypeRow kDtypes[] = {
    {"F64", torch::kFloat64, 8}, {"F32", torch::kFloat32, 4}, {"F16", torch::kFloat16, 2},
    {"BF16", torch::kBFloat16, 2}, {"I64", torch::kInt64, 8},  {"I32", torch::kInt32, 4},
    {"I16", torch::kInt16, 2},    {"I8", torch::kInt8, 1},     {"U8", torch::kUInt8, 1},
    {"BOOL", torch::kBool, 1},
};

/// The reference library's limit on the JSON header (MAX_HEADER_SIZE).
constexpr uint64_t kMaxHeaderBytes = 100000000;

}  // namespace

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  SafetensorsFile f;
  f.path_ = path;
  const auto mapping = map_file(path, "safetensors file");
  f.mapping_ = mapping;

  const uint64_t size = mapping->size;
  TORCH_CHECK(size >= 8, "safetensors file '", path, "': corrupt header: file has ", size,
              " bytes, expected at least the 8-byte header length");
  uint64_t header_len = 0;
  std::memcpy(&header_len, mapping->data, 8);
  TORCH_CHECK(header_len <= size - 8, "safetensors file '", path,
              "': corrupt header: header length ", header_len, " exceeds the ", size - 8,
              " bytes after the length field");
  TORCH_CHECK(header_len <= kMaxHeaderBytes, "safetensors file '", path,
              "': corrupt header: header length ", header_len, " exceeds the format's limit of ",
              kMaxHeaderBytes, " bytes");
  f.data_offset_ = 8 + header_len;
  const std::string text(reinterpret_cast<const char*>(mapping->data + 8), header_len);
  json::Value header;
  try {
    header = json::parse(text, "safetensors file '" + path + "' header");
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "corrupt header: ", e.msg());
  }
  TORCH_CHECK(header.is_object(), "safetensors file '", path,
              "': corrupt header: expected a JSON object, got ", header.type_name());
  const uint64_t data_size = size - f.data_offset_;
  for (const auto& member : header.items()) {
    const std::string& name = member.first;
    const json::Value& v = member.second;
    if (name == "__metadata__") {
      TORCH_CHECK(v.is_object(), "safetensors file '", path,
                  "': corrupt header: __metadata__ must be an object of strings, got ",
                  v.type_name());
      for (const auto& kv : v.items()) {
        TORCH_CHECK(kv.second.is_string(), "safetensors file '", path,
                    "': corrupt header: __metadata__['", kv.first, "'] must be a string, got ",
                    kv.second.type_name());
        f.metadata_[kv.first] = kv.second.as_string();
      }
      continue;
    }
    auto bad = [&](const std::string& what) {
      TORCH_CHECK(false, "safetensors file '", path, "': corrupt header: tensor '", name, "': ",
                  what);
    };
    if (f.index_.count(name)) bad("listed twice");
    if (!v.is_object() || !v.contains("dtype") || !v.contains("shape") ||
        !v.contains("data_offsets"))
      bad("expected an object with dtype, shape and data_offsets, got " + v.dump());
    SafetensorsTensorInfo info;
    info.name = name;
    if (!v["dtype"].is_string()) bad("dtype must be a string");
    info.dtype = v["dtype"].as_string();
    const DtypeRow* row = nullptr;
    for (const auto& r : kDtypes)
      if (info.dtype == r.name) row = &r;
    if (row == nullptr)
      bad("dtype '" + info.dtype +
          "' is not supported (supported: F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL)");
    info.torch_dtype = row->dtype;
    if (!v["shape"].is_array()) bad("shape must be an array");
    int64_t numel = 1;
    for (const auto& d : v["shape"].elements()) {
      if (!d.is_int() || d.as_int() < 0) bad("shape entries must be non-negative integers");
      info.shape.push_back(d.as_int());
      if (__builtin_mul_overflow(numel, d.as_int(), &numel))
        bad("the element count of shape " + v["shape"].dump() + " overflows int64");
    }
    int64_t nbytes = 0;
    if (__builtin_mul_overflow(numel, row->bytes, &nbytes))
      bad("the byte size of shape " + v["shape"].dump() + " overflows int64");
    const json::Value& off = v["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_int() || !off[1].is_int() ||
        off[0].as_int() < 0 || off[1].as_int() < off[0].as_int())
      bad("data_offsets must be [begin, end] with 0 <= begin <= end, got " + off.dump());
    info.begin = static_cast<uint64_t>(off[0].as_int());
    info.end = static_cast<uint64_t>(off[1].as_int());
    if (info.end > data_size)
      bad("data_offsets end " + std::to_string(info.end) + " is past the data section of " +
          std::to_string(data_size) + " bytes (truncated file?)");
    if (info.end - info.begin != static_cast<uint64_t>(nbytes))
      bad("data_offsets span " + std::to_string(info.end - info.begin) + " bytes, expected " +
          std::to_string(nbytes) + " for " + info.dtype + " " + v["shape"].dump());
    f.index_[name] = f.tensors_.size();
    f.tensors_.push_back(std::move(info));
  }
  // As the reference library validates: sorted by offset, the tensors tile the data section
  // exactly, with no gap, no overlap and no byte left over (a header length off by one shifts
  // the data section and fails here).
  std::vector<const SafetensorsTensorInfo*> order;
  for (const auto& t : f.tensors_) order.push_back(&t);
  std::sort(order.begin(), order.end(), [](const auto* a, const auto* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  uint64_t covered = 0;
  for (const auto* t : order) {
    TORCH_CHECK(t->begin == covered, "safetensors file '", path, "': corrupt header: tensor '",
                t->name, "': data_offsets begin at ", t->begin, ", expected ", covered,
                t->begin < covered ? " (overlaps the tensor before it)" : " (a gap before it)");
    covered = t->end;
  }
  TORCH_CHECK(covered == data_size, "safetensors file '", path, "': corrupt header: the tensors "
              "cover ", covered, " bytes of the ", data_size, "-byte data section (a wrong header "
              "length, or bytes no tensor owns)");
  return f;
}

std::vector<std::string> SafetensorsFile::tensor_names() const {
  std::vector<std::string> out;
  for (const auto& t : tensors_) out.push_back(t.name);
  return out;
}

const SafetensorsTensorInfo& SafetensorsFile::tensor_info(const std::string& name) const {
  auto it = index_.find(name);
  TORCH_CHECK(it != index_.end(), "safetensors file '", path_, "': tensor '", name,
              "' not found (the file has ", tensors_.size(), " tensors)");
  return tensors_[it->second];
}

torch::Tensor SafetensorsFile::tensor(const std::string& name) const {
  const SafetensorsTensorInfo& info = tensor_info(name);
  torch::Tensor out = torch::empty(info.shape, torch::TensorOptions().dtype(info.torch_dtype));
  if (info.end > info.begin)
    std::memcpy(out.data_ptr(), mapping_->data + data_offset_ + info.begin, info.end - info.begin);
  return out;
}

// ---------------------------------------------------------------------------------------------

SafetensorsCheckpoint SafetensorsCheckpoint::open(const std::string& path) {
  SafetensorsCheckpoint c;
  c.path_ = path;
  TORCH_CHECK(fs::exists(path), "safetensors checkpoint '", path, "': no such file or folder");
  std::string index_path;
  std::vector<std::string> shard_paths;
  if (fs::is_directory(path)) {
    const fs::path dir(path);
    if (fs::exists(dir / "model.safetensors.index.json")) {
      index_path = (dir / "model.safetensors.index.json").string();
    } else if (fs::exists(dir / "model.safetensors")) {
      shard_paths.push_back((dir / "model.safetensors").string());
    } else {
      for (const auto& e : fs::directory_iterator(dir))
        if (e.path().extension() == ".safetensors") shard_paths.push_back(e.path().string());
      std::sort(shard_paths.begin(), shard_paths.end());
      TORCH_CHECK(!shard_paths.empty(), "safetensors checkpoint '", path,
                  "': the folder has no model.safetensors.index.json and no *.safetensors");
    }
  } else if (path.size() >= 5 && path.compare(path.size() - 5, 5, ".json") == 0) {
    index_path = path;
  } else {
    shard_paths.push_back(path);
  }

  if (!index_path.empty()) {
    const json::Value index = json::parse_file(index_path);
    TORCH_CHECK(index.is_object() && index.contains("weight_map") &&
                    index["weight_map"].is_object(),
                "safetensors index '", index_path, "': expected an object with a weight_map");
    const fs::path dir = fs::path(index_path).parent_path();
    std::map<std::string, size_t> file_of_shard;
    std::vector<std::pair<std::string, std::string>> entries;
    for (const auto& kv : index["weight_map"].items()) {
      TORCH_CHECK(kv.second.is_string(), "safetensors index '", index_path, "': weight_map['",
                  kv.first, "'] must be a file name");
      const std::string shard = kv.second.as_string();
      if (!file_of_shard.count(shard)) {
        file_of_shard[shard] = shard_paths.size();
        shard_paths.push_back((dir / shard).string());
      }
      entries.emplace_back(kv.first, shard);
    }
    for (const auto& p : shard_paths) c.files_.push_back(SafetensorsFile::open(p));
    for (const auto& e : entries) {
      const size_t fi = file_of_shard[e.second];
      TORCH_CHECK(c.files_[fi].has_tensor(e.first), "safetensors index '", index_path,
                  "': tensor '", e.first, "' is mapped to '", shard_paths[fi],
                  "' which does not contain it");
      c.where_[e.first] = fi;
    }
    return c;
  }

  for (const auto& p : shard_paths) c.files_.push_back(SafetensorsFile::open(p));
  for (size_t fi = 0; fi < c.files_.size(); ++fi)
    for (const auto& name : c.files_[fi].tensor_names()) c.where_[name] = fi;
  return c;
}

std::vector<std::string> SafetensorsCheckpoint::tensor_names() const {
  std::vector<std::string> out;
  for (const auto& kv : where_) out.push_back(kv.first);
  return out;
}

const SafetensorsTensorInfo& SafetensorsCheckpoint::tensor_info(const std::string& name) const {
  auto it = where_.find(name);
  TORCH_CHECK(it != where_.end(), "safetensors checkpoint '", path_, "': tensor '", name,
              "' not found (", where_.size(), " tensors in ", files_.size(), " file(s))");
  return files_[it->second].tensor_info(name);
}

torch::Tensor SafetensorsCheckpoint::tensor(const std::string& name) const {
  auto it = where_.find(name);
  TORCH_CHECK(it != where_.end(), "safetensors checkpoint '", path_, "': tensor '", name,
              "' not found (", where_.size(), " tensors in ", files_.size(), " file(s))");
  return files_[it->second].tensor(name);
}

}  // namespace slowed_examples
