#include "common/mapped_file.h"

#include <c10/util/Exception.h>

#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace slowed_examples {

MappedFile::~MappedFile() {
  if (data != nullptr && size > 0) munmap(const_cast<uint8_t*>(data), size);
}

std::shared_ptr<const MappedFile> map_file(const std::string& path, const char* kind) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  TORCH_CHECK(fd >= 0, kind, " '", path, "': cannot open (", std::strerror(errno), ")");
  struct stat st;
  if (fstat(fd, &st) != 0) {
    const int e = errno;
    ::close(fd);
    TORCH_CHECK(false, kind, " '", path, "': cannot stat (", std::strerror(e), ")");
  }
  auto mapping = std::make_shared<MappedFile>();
  mapping->size = static_cast<size_t>(st.st_size);
  if (mapping->size > 0) {
    void* p = mmap(nullptr, mapping->size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      const int e = errno;
      ::close(fd);
      mapping->size = 0;
      TORCH_CHECK(false, kind, " '", path, "': mmap failed (", std::strerror(e), ")");
    }
    mapping->data = static_cast<const uint8_t*>(p);
  }
  ::close(fd);
  return mapping;
}

}  // namespace slowed_examples
