// pybind11 module sat_kernels._C: plain entry points taking device addresses, sizes and the CUDA stream as integers.
// Compiled by the host compiler; the kernels and their launchers are in the .cu files.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "sat_kernels.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "CUDA kernels of sat_kernels (selection, gathers, scatters). Call them through sat_kernels.ops.mlp.cuda, "
            "which checks the tensors first.";
  m.def("select_kept", &sat::select_kept, py::arg("scores"), py::arg("uniform"), py::arg("workspace"),
        py::arg("out"), py::arg("out_int32"), py::arg("rows"), py::arg("n"), py::arg("k"), py::arg("strategy"),
        py::arg("seed"), py::arg("offset"), py::arg("device"), py::arg("stream"),
        "Kept set of each row of fp32 scores [rows, n]: sorted indices of the k largest selection keys.");
  m.def("gather_rows", &sat::gather_rows, py::arg("src"), py::arg("idx"), py::arg("out"), py::arg("n"), py::arg("k"),
        py::arg("width"), py::arg("elem_size"), py::arg("device"), py::arg("stream"),
        "out[j, :] = src[idx[j], :]");
  m.def("gather_cols", &sat::gather_cols, py::arg("src"), py::arg("idx"), py::arg("out"), py::arg("rows"),
        py::arg("n"), py::arg("k"), py::arg("elem_size"), py::arg("device"), py::arg("stream"),
        "out[r, j] = src[r, idx[j]]");
  m.def("scatter_rows", &sat::scatter_rows, py::arg("src"), py::arg("idx"), py::arg("out"), py::arg("n"),
        py::arg("k"), py::arg("width"), py::arg("elem_size"), py::arg("device"), py::arg("stream"),
        "out[idx[j], :] = src[j, :], zero elsewhere");
  m.def("scatter_cols", &sat::scatter_cols, py::arg("src"), py::arg("idx"), py::arg("out"), py::arg("rows"),
        py::arg("n"), py::arg("k"), py::arg("elem_size"), py::arg("device"), py::arg("stream"),
        "out[r, idx[j]] = src[r, j], zero elsewhere");
  m.def("host_selection_keys", &sat::host_selection_keys, py::arg("scores"), py::arg("uniform"), py::arg("keys"),
        py::arg("n"), py::arg("row"), py::arg("strategy"), py::arg("seed"), py::arg("offset"),
        "The selection keys of one row computed on the host (host addresses), for tests.");
  m.def("host_philox4x32_10", &sat::host_philox4x32_10, py::arg("c0"), py::arg("c1"), py::arg("c2"), py::arg("c3"),
        py::arg("k0"), py::arg("k1"), "Philox4x32-10 of counter (c0..c3) under key (k0, k1), on the host.");
  m.def("compiled_archs", &sat::compiled_archs, "Virtual architectures compiled in, e.g. [800, 900].");
  m.def("runtime_version", &sat::runtime_version, "CUDA runtime version built against, e.g. 13000.");
  m.def("device_count", &sat::device_count, "Visible CUDA devices (0 without a driver or GPU).");
}
