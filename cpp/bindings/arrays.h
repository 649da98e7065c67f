// Array adaptation shared by the binding files: numpy arrays in, raw spans out, with errors that
// say what was expected and what came. Nothing is ever converted or copied silently.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstddef>
#include <string>

namespace paramserver::bindings {

namespace py = pybind11;


inline std::string dtype_name(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

// Whether `a` stores its numbers in this machine's byte order. A big-endian array on a
// little-endian machine has the right kind and size but would be read as other numbers.
inline bool native_order(const py::array& a) { return a.dtype().attr("isnative").cast<bool>(); }

// Checks that `a` is a C-contiguous float32 array of exactly `expected` elements (any shape) and
// returns its data. A wrong dtype is a TypeError and never converted: a silent copy would hide a
// 2x cost (float64) or a precision loss from the caller.
template <typename T>
T* span_of(py::array& a, const char* what, std::size_t expected, bool writable, const char* dtype) {
  if (!py::isinstance<py::array_t<T>>(a) || a.dtype().kind() != py::dtype::of<T>().kind() ||
      a.itemsize() != static_cast<py::ssize_t>(sizeof(T)) || !native_order(a)) {
    throw py::type_error(std::string(what) + " must be a numpy " + dtype + " array, got dtype " +
                         dtype_name(a));
  }
  if (!(a.flags() & py::array::c_style)) {
    throw py::value_error(std::string(what) + " must be C-contiguous");
  }
  if (static_cast<std::size_t>(a.size()) != expected) {
    throw py::value_error(std::string(what) + " must have " + std::to_string(expected) +
                          " elements, got " + std::to_string(a.size()));
  }
  if (writable) {
    if (!a.writeable()) throw py::value_error(std::string(what) + " must be writable");
    return static_cast<T*>(a.mutable_data());
  }
  return const_cast<T*>(static_cast<const T*>(a.data()));
}

inline float* floats(py::array& a, const char* what, std::size_t expected, bool writable) {
  return span_of<float>(a, what, expected, writable, "float32");
}

}  // namespace paramserver::bindings
