// Bindings of paramserver::EmbeddingTable and the deterministic initializers.
//
// Ids arrive as numpy int64 or uint64 arrays of any shape (int64 is reinterpreted bit for bit, so
// -1 is id 2^64-1); values as float32 arrays shaped (*ids.shape, dim). Everything is checked while
// holding the GIL and before the table is touched; the work itself runs with the GIL released.
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "arrays.h"
#include "paramserver/embedding_table.h"
#include "paramserver/initializer.h"

namespace paramserver::bindings {

namespace {

std::string shape_str(const std::vector<py::ssize_t>& shape) {
  std::string s = "(";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    s += std::to_string(shape[i]);
    if (shape.size() == 1 || i + 1 < shape.size()) s += shape.size() == 1 ? "," : ", ";
  }
  return s + ")";
}

std::vector<py::ssize_t> shape_of(const py::array& a) {
  return std::vector<py::ssize_t>(a.shape(), a.shape() + a.ndim());
}

void require_layout(const py::array& a, const char* what) {
  if (!(a.flags() & py::array::c_style)) {
    throw py::value_error(std::string(what) + " must be C-contiguous (use np.ascontiguousarray)");
  }
  // numpy arrays are aligned unless made from an offset buffer; the core reads whole words.
  if (!(a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_)) {
    throw py::value_error(std::string(what) + " must be aligned to its dtype (got an unaligned view)");
  }
}

// The ids of `a` as uint64 words. No conversion: a float, narrower or non-native-endian dtype is a
// TypeError (a big-endian '>u8' array was once read as other ids).
const std::uint64_t* id_span(const py::array& a, const char* what = "ids") {
  const auto kind = a.dtype().kind();
  if (!((kind == 'i' || kind == 'u') && a.itemsize() == 8) || !native_order(a)) {
    throw py::type_error(std::string(what) + " must be a numpy int64 or uint64 array in native "
                         "byte order, got dtype " + dtype_name(a));
  }
  require_layout(a, what);
  return static_cast<const std::uint64_t*>(a.data());
}

// A float32 array of exactly `shape`, else TypeError (dtype) or ValueError (shape, layout).
float* float_span(py::array& a, const char* what, const std::vector<py::ssize_t>& shape,
                  bool writable) {
  if (a.dtype().kind() != 'f' || a.itemsize() != 4 || !native_order(a)) {
    throw py::type_error(std::string(what) + " must be a numpy float32 array in native byte "
                         "order, got dtype " + dtype_name(a));
  }
  if (shape_of(a) != shape) {
    throw py::value_error(std::string(what) + " must have shape " + shape_str(shape) + ", got " +
                          shape_str(shape_of(a)));
  }
  require_layout(a, what);
  if (writable) {
    if (!a.writeable()) throw py::value_error(std::string(what) + " must be writable");
    return static_cast<float*>(a.mutable_data());
  }
  return const_cast<float*>(static_cast<const float*>(a.data()));
}

std::vector<py::ssize_t> row_shape(const py::array& ids, std::size_t dim) {
  auto shape = shape_of(ids);
  shape.push_back(static_cast<py::ssize_t>(dim));
  return shape;
}

// A numpy array that owns `v` without copying it.
template <typename T>
py::array_t<T> adopt(std::vector<T>&& v, std::vector<py::ssize_t> shape) {
  auto* owned = new std::vector<T>(std::move(v));
  py::capsule free_when_done(owned, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>(std::move(shape), owned->data(), free_when_done);
}

// Python int (any sign) -> id bits, as numpy int64 ids are read.
std::uint64_t id_of(const py::int_& id) {
  const py::int_ low = py::int_(-(py::int_(1) << py::int_(63)).cast<py::object>());
  if (id < py::int_(0)) {
    if (id < low) throw py::value_error("id " + py::str(id).cast<std::string>() + " is below -2**63");
    return static_cast<std::uint64_t>(id.cast<std::int64_t>());
  }
  if (id >= (py::int_(1) << py::int_(64)).cast<py::int_>()) {
    throw py::value_error("id " + py::str(id).cast<std::string>() + " does not fit in 64 bits");
  }
  return id.cast<std::uint64_t>();
}

}  // namespace

void bind_embedding(py::module_& m) {
  py::enum_<InitializerKind>(m, "InitializerKind")
      .value("Zeros", InitializerKind::kZeros)
      .value("Uniform", InitializerKind::kUniform)
      .value("Normal", InitializerKind::kNormal);

  py::class_<InitializerConfig>(m, "InitializerConfig")
      .def(py::init<>())
      .def_readwrite("kind", &InitializerConfig::kind)
      .def_readwrite("low", &InitializerConfig::low)
      .def_readwrite("high", &InitializerConfig::high)
      .def_readwrite("mean", &InitializerConfig::mean)
      .def_readwrite("stddev", &InitializerConfig::stddev)
      .def("__repr__", [](const InitializerConfig& c) { return describe(c); });

  m.def("validate_initializer", [](const InitializerConfig& c) { validate(c); },
        py::arg("config"));

  m.def(
      "initialize_rows",
      [](const InitializerConfig& config, std::uint64_t seed, py::array ids, py::array out) {
        validate(config);
        const std::uint64_t* id = id_span(ids);
        if (out.ndim() != ids.ndim() + 1) {
          throw py::value_error("out must have ids.ndim + 1 dimensions, got shape " +
                                shape_str(shape_of(out)));
        }
        const std::size_t dim = static_cast<std::size_t>(out.shape(out.ndim() - 1));
        float* o = float_span(out, "out", row_shape(ids, dim), true);
        const std::size_t n = static_cast<std::size_t>(ids.size());
        // Safe without the GIL: both arrays are kept alive by this frame; the work is pure.
        py::gil_scoped_release release;
        for (std::size_t i = 0; i < n; ++i) initialize_row(config, seed, id[i], o + i * dim, dim);
      },
      py::arg("config"), py::arg("seed"), py::arg("ids"), py::arg("out"));

  py::class_<EmbeddingTable>(m, "EmbeddingTable")
      .def(py::init<std::size_t, const OptimizerConfig&, const InitializerConfig&, std::uint64_t,
                    std::size_t>(),
           py::arg("dim"), py::arg("optimizer"), py::arg("initializer") = InitializerConfig{},
           py::arg("seed") = 0, py::arg("num_stripes") = EmbeddingTable::kDefaultStripes)
      .def_property_readonly("dim", &EmbeddingTable::dim)
      .def_property_readonly("seed", &EmbeddingTable::seed)
      .def_property_readonly("num_stripes", &EmbeddingTable::num_stripes)
      .def_property_readonly("num_slots", &EmbeddingTable::num_slots)
      .def_property_readonly("optimizer", &EmbeddingTable::optimizer)
      .def_property_readonly("initializer", &EmbeddingTable::initializer)
      .def("num_rows", &EmbeddingTable::num_rows, py::call_guard<py::gil_scoped_release>())
      .def("bytes", &EmbeddingTable::bytes, py::call_guard<py::gil_scoped_release>())
      .def("contains",
           [](const EmbeddingTable& t, const py::int_& id) { return t.contains(id_of(id)); },
           py::arg("id"))
      .def(
          "pull",
          [](EmbeddingTable& t, py::array ids, py::object out, int num_threads) {
            const std::uint64_t* id = id_span(ids);
            const auto shape = row_shape(ids, t.dim());
            py::array result = out.is_none() ? py::array_t<float>(shape) : out.cast<py::array>();
            float* o = float_span(result, "out", shape, true);
            // Safe without the GIL: `ids` and `result` stay referenced by this frame, and the
            // table serializes concurrent callers with its stripe locks.
            {
              py::gil_scoped_release release;
              t.pull(id, static_cast<std::size_t>(ids.size()), o, num_threads);
            }
            return result;
          },
          py::arg("ids"), py::arg("out") = py::none(), py::arg("num_threads") = 0)
      .def(
          "lookup",
          [](const EmbeddingTable& t, py::array ids, py::object out, int num_threads) {
            const std::uint64_t* id = id_span(ids);
            const auto shape = row_shape(ids, t.dim());
            py::array result = out.is_none() ? py::array_t<float>(shape) : out.cast<py::array>();
            float* o = float_span(result, "out", shape, true);
            // Safe without the GIL: as in pull; lookup never changes the table.
            {
              py::gil_scoped_release release;
              t.lookup(id, static_cast<std::size_t>(ids.size()), o, num_threads);
            }
            return result;
          },
          py::arg("ids"), py::arg("out") = py::none(), py::arg("num_threads") = 0)
      .def(
          "push",
          [](EmbeddingTable& t, py::array ids, py::array grads, int num_threads) {
            const std::uint64_t* id = id_span(ids);
            const float* g = float_span(grads, "grads", row_shape(ids, t.dim()), false);
            // Safe without the GIL: as in pull; every argument was checked above, so the table
            // is not touched unless the whole batch is valid.
            py::gil_scoped_release release;
            t.push(id, static_cast<std::size_t>(ids.size()), g, num_threads);
          },
          py::arg("ids"), py::arg("grads"), py::arg("num_threads") = 0)
      .def("export_rows",
           [](const EmbeddingTable& t) {
             EmbeddingRows rows;
             {
               py::gil_scoped_release release;
               rows = t.export_rows();
             }
             const auto n = static_cast<py::ssize_t>(rows.ids.size());
             const auto dim = static_cast<py::ssize_t>(t.dim());
             const auto s = static_cast<py::ssize_t>(t.num_slots());
             return py::make_tuple(adopt(std::move(rows.ids), {n}),
                                   adopt(std::move(rows.values), {n, dim}),
                                   adopt(std::move(rows.slots), {n, s, dim}),
                                   adopt(std::move(rows.steps), {n}));
           })
      .def(
          "export_rows_into",
          [](const EmbeddingTable& t, py::array ids, py::array values, py::array slots,
             py::array steps) {
            if (ids.ndim() != 1) {
              throw py::value_error("ids must be one-dimensional, got shape " +
                                    shape_str(shape_of(ids)));
            }
            const auto cap = ids.shape(0);
            const auto kind = ids.dtype().kind();
            if (kind != 'u' || ids.itemsize() != 8) {
              throw py::type_error("ids must be a numpy uint64 array, got dtype " + dtype_name(ids));
            }
            require_layout(ids, "ids");
            if (!ids.writeable()) throw py::value_error("ids must be writable");
            auto* id = static_cast<std::uint64_t*>(ids.mutable_data());
            const auto dim = static_cast<py::ssize_t>(t.dim());
            float* v = float_span(values, "values", {cap, dim}, true);
            float* s =
                float_span(slots, "slots", {cap, static_cast<py::ssize_t>(t.num_slots()), dim}, true);
            if (steps.dtype().kind() != 'i' || steps.itemsize() != 8) {
              throw py::type_error("steps must be a numpy int64 array, got dtype " +
                                   dtype_name(steps));
            }
            if (shape_of(steps) != std::vector<py::ssize_t>{cap}) {
              throw py::value_error("steps must have shape " + shape_str({cap}) + ", got " +
                                    shape_str(shape_of(steps)));
            }
            require_layout(steps, "steps");
            if (!steps.writeable()) throw py::value_error("steps must be writable");
            auto* st = static_cast<std::int64_t*>(steps.mutable_data());
            // Safe without the GIL: the four arrays are referenced by this frame.
            py::gil_scoped_release release;
            return t.export_rows_into(static_cast<std::size_t>(cap), id, v, s, st);
          },
          py::arg("ids"), py::arg("values"), py::arg("slots"), py::arg("steps"))
      .def(
          "import_rows",
          [](EmbeddingTable& t, py::array ids, py::array values, py::array slots, py::array steps) {
            if (ids.ndim() != 1) {
              throw py::value_error("ids must be one-dimensional, got shape " +
                                    shape_str(shape_of(ids)));
            }
            const std::uint64_t* id = id_span(ids);
            const auto n = ids.shape(0);
            const auto dim = static_cast<py::ssize_t>(t.dim());
            const float* v = float_span(values, "values", {n, dim}, false);
            const float* s =
                float_span(slots, "slots", {n, static_cast<py::ssize_t>(t.num_slots()), dim}, false);
            if (steps.dtype().kind() != 'i' || steps.itemsize() != 8) {
              throw py::type_error("steps must be a numpy int64 array, got dtype " +
                                   dtype_name(steps));
            }
            if (shape_of(steps) != std::vector<py::ssize_t>{n}) {
              throw py::value_error("steps must have shape " + shape_str({n}) + ", got " +
                                    shape_str(shape_of(steps)));
            }
            require_layout(steps, "steps");
            const auto* st = static_cast<const std::int64_t*>(steps.data());
            py::gil_scoped_release release;
            t.import_rows(id, static_cast<std::size_t>(n), v, s, st);
          },
          py::arg("ids"), py::arg("values"), py::arg("slots"), py::arg("steps"))
      .def("clear", &EmbeddingTable::clear, py::call_guard<py::gil_scoped_release>());
}

}  // namespace paramserver::bindings
