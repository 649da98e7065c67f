// Bindings of paramserver::DenseTable.
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "arrays.h"
#include "blocks.h"
#include "paramserver/dense_table.h"
#include "paramserver/optimizer.h"
#include "paramserver/parallel.h"

namespace paramserver::bindings {

void bind_dense(py::module_& m) {
  py::class_<DenseTable>(m, "DenseTable")
      .def(py::init<std::size_t, std::size_t, const OptimizerConfig&, const std::vector<std::int64_t>&>(),
           py::arg("num_elements"), py::arg("block_size"), py::arg("optimizer"),
           py::arg("held") = std::vector<std::int64_t>{})
      .def_property_readonly("num_elements", &DenseTable::num_elements)
      .def_property_readonly("block_size", &DenseTable::block_size)
      .def_property_readonly("num_blocks", &DenseTable::num_blocks)
      .def_property_readonly("num_slots",
                             [](const DenseTable& t) { return num_slots(t.optimizer()); })
      .def("held_blocks", &DenseTable::held_blocks)
      .def("holds", &DenseTable::holds, py::arg("block"))
      .def("block_offset", &DenseTable::block_offset, py::arg("block"))
      .def("block_length", &DenseTable::block_length, py::arg("block"))
      .def("bytes", &DenseTable::bytes)
      .def("step", &DenseTable::step, py::arg("block"))
      .def(
          "apply",
          [](DenseTable& t, std::int64_t block, py::array grad) {
            const float* g = floats(grad, "grad", t.block_length(block), false);
            total_length(t, {block});
            // Safe without the GIL: `grad` is kept alive by this frame and the block has its own lock.
            py::gil_scoped_release release;
            t.apply(block, g);
          },
          py::arg("block"), py::arg("grad"))
      .def(
          "read",
          [](const DenseTable& t, std::int64_t block, py::array out) {
            float* o = floats(out, "out", t.block_length(block), true);
            total_length(t, {block});
            py::gil_scoped_release release;
            t.read(block, o);
          },
          py::arg("block"), py::arg("out"))
      .def(
          "assign",
          [](DenseTable& t, std::int64_t block, py::array values) {
            const float* v = floats(values, "values", t.block_length(block), false);
            total_length(t, {block});
            py::gil_scoped_release release;
            t.assign(block, v);
          },
          py::arg("block"), py::arg("values"))
      .def(
          "apply_many",
          [](DenseTable& t, py::array blocks, py::array grads, int num_threads) {
            const auto ids = block_list(blocks);
            const float* g = floats(grads, "grads", total_length(t, ids), false);
            const auto off = offsets_of(t, ids);
            // Every id was checked above, so no block is updated unless all can be.
            py::gil_scoped_release release;
            parallel_for(static_cast<std::int64_t>(ids.size()), num_threads,
                                      [&](std::int64_t i) { t.apply(ids[i], g + off[i]); });
          },
          py::arg("blocks"), py::arg("grads"), py::arg("num_threads") = 1)
      .def(
          "read_many",
          [](const DenseTable& t, py::array blocks, py::array out, int num_threads) {
            const auto ids = block_list(blocks);
            float* o = floats(out, "out", total_length(t, ids), true);
            const auto off = offsets_of(t, ids);
            py::gil_scoped_release release;
            parallel_for(static_cast<std::int64_t>(ids.size()), num_threads,
                                      [&](std::int64_t i) { t.read(ids[i], o + off[i]); });
          },
          py::arg("blocks"), py::arg("out"), py::arg("num_threads") = 1)
      .def(
          "assign_many",
          [](DenseTable& t, py::array blocks, py::array values) {
            const auto ids = block_list(blocks);
            const float* v = floats(values, "values", total_length(t, ids), false);
            const auto off = offsets_of(t, ids);
            py::gil_scoped_release release;
            for (std::size_t i = 0; i < ids.size(); ++i) t.assign(ids[i], v + off[i]);
          },
          py::arg("blocks"), py::arg("values"))
      .def(
          "read_slot",
          [](const DenseTable& t, std::int64_t block, int slot, py::array out) {
            float* o = floats(out, "out", t.block_length(block), true);
            t.read_slot(block, slot, o);
          },
          py::arg("block"), py::arg("slot"), py::arg("out"))
      .def(
          "restore_block",
          [](DenseTable& t, std::int64_t block, py::array values, std::vector<py::array> slots,
             std::int64_t step) {
            const std::size_t len = t.block_length(block);
            const int want = num_slots(t.optimizer());
            if (static_cast<int>(slots.size()) != want) {
              throw py::value_error("expected " + std::to_string(want) + " slot arrays, got " +
                                    std::to_string(slots.size()));
            }
            const float* v = floats(values, "values", len, false);
            std::vector<const float*> sp;
            for (auto& s : slots) sp.push_back(floats(s, "slot", len, false));
            t.restore_block(block, v, sp.data(), step);
          },
          py::arg("block"), py::arg("values"), py::arg("slots"), py::arg("step"));
}

}  // namespace paramserver::bindings
