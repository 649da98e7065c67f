// paramserver._core.assemble: a reply message built in one allocation, with the dense tables'
// values read straight into it. The reply's headers are made in Python (paramserver.wire); the
// payload of a pull used to be read into an array and then joined with them, two copies of every
// value; here it is one.
#include <Python.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "arrays.h"
#include "blocks.h"
#include "paramserver/dense_table.h"
#include "paramserver/parallel.h"

namespace paramserver::bindings {

namespace {

// One part of the message: bytes to copy (a header, or any buffer such as embedding rows), or a
// read of dense blocks.
struct Part {
  const char* data = nullptr;       // bytes to copy
  const DenseTable* table = nullptr;  // or blocks to read
  std::vector<std::int64_t> blocks;
  std::vector<std::size_t> offsets;
  std::size_t size = 0;             // bytes
};

}  // namespace

void bind_reply(py::module_& m) {
  m.def(
      "assemble",
      [](py::list parts, int num_threads, py::object into) -> py::object {
        // Buffers stay referenced by `parts` (the caller's list) while the GIL is released.
        std::vector<Part> plan;
        plan.reserve(parts.size());
        std::vector<py::buffer_info> views;  // keeps the buffers' views alive
        views.reserve(parts.size());
        std::size_t total = 0;
        for (py::handle item : parts) {
          Part part;
          if (py::isinstance<py::tuple>(item)) {
            auto pair = item.cast<py::tuple>();
            if (pair.size() != 2) throw py::value_error("a read is (DenseTable, blocks)");
            part.table = &pair[0].cast<const DenseTable&>();
            py::array blocks = pair[1].cast<py::array>();
            part.blocks = block_list(blocks);
            part.size = total_length(*part.table, part.blocks) * sizeof(float);
            part.offsets = offsets_of(*part.table, part.blocks);
          } else {
            views.push_back(py::reinterpret_borrow<py::buffer>(item).request());
            const py::buffer_info& info = views.back();
            if (info.ndim > 1 && info.strides.back() != info.itemsize) {
              throw py::value_error("assemble: a buffer part must be C-contiguous");
            }
            part.data = static_cast<const char*>(info.ptr);
            part.size = static_cast<std::size_t>(info.size * info.itemsize);
          }
          total += part.size;
          plan.push_back(std::move(part));
        }
        // Into the caller's writable buffer when it is given and large enough (a shared-memory
        // segment), else a new bytes object, filled before anyone else can see it (as CPython's
        // own constructors do).
        py::object out;
        char* dst = nullptr;
        py::buffer_info target;
        if (!into.is_none()) {
          target = py::reinterpret_borrow<py::buffer>(into).request(/*writable=*/true);
          if (static_cast<std::size_t>(target.size * target.itemsize) >= total) {
            dst = static_cast<char*>(target.ptr);
            out = py::int_(total);
          }
        }
        if (dst == nullptr) {
          PyObject* raw = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(total));
          if (raw == nullptr) throw py::error_already_set();
          out = py::reinterpret_steal<py::bytes>(raw);
          dst = PyBytes_AS_STRING(raw);
        }
        bool misaligned = false;
        {
          py::gil_scoped_release release;
          std::size_t pos = 0;
          for (const Part& part : plan) {
            if (part.table == nullptr) {
              if (part.size) std::memcpy(dst + pos, part.data, part.size);
            } else {
              // The writer aligned the payload (paramserver.wire pads it to 16 bytes in the
              // message, and a bytes object's data is 16-byte aligned), so it is float-aligned.
              if (reinterpret_cast<std::uintptr_t>(dst + pos) % alignof(float) != 0) {
                misaligned = true;
                break;
              }
              float* values = reinterpret_cast<float*>(dst + pos);
              const Part* p = &part;
              parallel_for(static_cast<std::int64_t>(p->blocks.size()), num_threads,
                           [&](std::int64_t i) {
                             p->table->read(p->blocks[static_cast<std::size_t>(i)],
                                            values + p->offsets[static_cast<std::size_t>(i)]);
                           });
            }
            pos += part.size;
          }
        }
        if (misaligned) throw py::value_error("assemble: a dense payload is not float-aligned");
        return out;
      },
      py::arg("parts"), py::arg("num_threads") = 1, py::arg("into") = py::none(),
      "`parts` in order, as one bytes object: buffers (bytes, numpy arrays) copied, and "
      "(DenseTable, int64 blocks) pairs read from the table. With `into` (a writable buffer, "
      "16-byte aligned) large enough for them, they are written at its start instead and the "
      "number of bytes written is returned.");
}

}  // namespace paramserver::bindings
