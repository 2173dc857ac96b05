// SPDX-License-Identifier: Apache-2.0
// The fourbit._C extension module. Importing it runs the static TORCH_LIBRARY registrations of every operator; the
// module itself only answers questions about the build and the CPU (no tensors cross this boundary: ops go through
// torch.ops.fourbit). Written against the plain Python C API, so it needs neither pybind11 nor torch's Python headers.
#include <Python.h>

#include <c10/util/Exception.h>

#include "cpu/isa.h"

namespace {

PyObject* cpu_isa(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(fourbit::cpu::select_kernels().isa);
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
}

PyObject* supported_cpu_isas(PyObject*, PyObject*) {
  const std::vector<std::string> names = fourbit::cpu::supported_isas();
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(names.size()));
  if (list == nullptr) return nullptr;
  for (size_t i = 0; i < names.size(); ++i) {
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), PyUnicode_FromString(names[i].c_str()));
  }
  return list;
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS,
     "The instruction set the CPU kernels use now (FOURBIT_CPU_ISA, or the best this CPU supports)."},
    {"supported_cpu_isas", supported_cpu_isas, METH_NOARGS,
     "Instruction sets with kernels in this build that this CPU can run, best first."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fourbit compiled kernels", -1, methods, nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module); }
