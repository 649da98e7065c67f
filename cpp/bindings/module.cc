// paramserver._core: the one binding module. Thin by design: it adapts numpy arrays to spans and
// C++ exceptions to Python ones. Defaults, user-facing validation and docstrings live in
// python/paramserver/. One file per concept: optimizer config here, tables in their own files.
#include <pybind11/pybind11.h>

#include "paramserver/dense_table.h"
#include "paramserver/optimizer.h"

namespace py = pybind11;
using paramserver::OptimizerConfig;
using paramserver::OptimizerKind;

namespace paramserver::bindings {
void bind_dense(py::module_& m);
void bind_embedding(py::module_& m);
void bind_reply(py::module_& m);
}  // namespace paramserver::bindings

PYBIND11_MODULE(_core, m) {
  m.doc() = "paramserver C++ core (private; use the paramserver package)";

  py::enum_<OptimizerKind>(m, "OptimizerKind")
      .value("SGD", OptimizerKind::kSGD)
      .value("Adagrad", OptimizerKind::kAdagrad)
      .value("Adam", OptimizerKind::kAdam)
      .value("AdamW", OptimizerKind::kAdamW);

  py::class_<OptimizerConfig>(m, "OptimizerConfig")
      .def(py::init<>())
      .def_readwrite("kind", &OptimizerConfig::kind)
      .def_readwrite("lr", &OptimizerConfig::lr)
      .def_readwrite("momentum", &OptimizerConfig::momentum)
      .def_readwrite("dampening", &OptimizerConfig::dampening)
      .def_readwrite("nesterov", &OptimizerConfig::nesterov)
      .def_readwrite("lr_decay", &OptimizerConfig::lr_decay)
      .def_readwrite("initial_accumulator_value", &OptimizerConfig::initial_accumulator_value)
      .def_readwrite("beta1", &OptimizerConfig::beta1)
      .def_readwrite("beta2", &OptimizerConfig::beta2)
      .def_readwrite("amsgrad", &OptimizerConfig::amsgrad)
      .def_readwrite("bias_correction", &OptimizerConfig::bias_correction)
      .def_readwrite("eps", &OptimizerConfig::eps)
      .def_readwrite("weight_decay", &OptimizerConfig::weight_decay)
      .def_readwrite("maximize", &OptimizerConfig::maximize);

  m.def("validate", &paramserver::validate, py::arg("config"));
  m.def("num_slots", &paramserver::num_slots, py::arg("config"));
  m.def("kernel_isa", &paramserver::kernel_isa);
  m.def("set_kernel_isa", &paramserver::set_kernel_isa, py::arg("name"));

  // A table larger than the machine's memory, refused before allocating: the package's
  // ResourceExhaustedError (a MemoryError), with the core's message.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const paramserver::TableTooLarge& e) {
      py::object error = py::module_::import("paramserver.errors").attr("ResourceExhaustedError");
      PyErr_SetString(error.ptr(), e.what());
    }
  });

  paramserver::bindings::bind_dense(m);
  paramserver::bindings::bind_embedding(m);
  paramserver::bindings::bind_reply(m);
}
