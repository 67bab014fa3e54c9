// The drs_ext operator library: every schema lives here, the kernels register per backend in
// csrc/cpu and csrc/cuda. The Python module _C only reports how the extension was built.
#include <Python.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <string>

namespace drs_ext {

// noisy_views takes sigma as a list (one value, or one per branch) or instead, with the list empty,
// as a tensor of one value per image (and branch): sigma_per_image, a trailing argument with a
// default, so calls of the list form read as before. One schema rather than an overload: one fake
// impl, one autograd formula, one graph node under torch.compile.
TORCH_LIBRARY(drs_ext, m) {
  m.def(
      "noisy_views(Tensor x, float[] sigma, int num, int seed, int offset, Tensor stream, "
      "str partition, str fill, ScalarType? out_dtype, Tensor? sigma_per_image=None) -> Tensor");
  m.def("vote_counts(Tensor logits) -> Tensor");
}

#ifndef DRS_WITH_CUDA
// A CPU-only build still answers CUDA tensors with an actionable message rather than the
// dispatcher's "could not run ... with arguments from the 'CUDA' backend".
[[noreturn]] void built_without_cuda() {
  TORCH_CHECK(false,
              "drs_ext was built without CUDA kernels, so it cannot run on CUDA tensors. "
              "Rebuild it where torch has CUDA and nvcc is on PATH (or set FORCE_CUDA=1 and "
              "TORCH_CUDA_ARCH_LIST), e.g. `pip install --no-build-isolation -e .`");
}
TORCH_LIBRARY_IMPL(drs_ext, CUDA, m) {
  m.impl("noisy_views",
         [](const at::Tensor&, at::ArrayRef<double>, int64_t, int64_t, int64_t, const at::Tensor&,
            c10::string_view, c10::string_view, std::optional<at::ScalarType>,
            const std::optional<at::Tensor>&) -> at::Tensor {
           built_without_cuda();
         });
  m.impl("vote_counts", [](const at::Tensor&) -> at::Tensor { built_without_cuda(); });
}
#endif

}  // namespace drs_ext

#ifndef DRS_VERSION
#define DRS_VERSION "0.0.0"
#endif
#ifndef DRS_CUDA_ARCHS
#define DRS_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(_C, module) {
  module.doc() = "drs_ext build information; the operators are torch.ops.drs_ext.*";
  module.attr("__version__") = DRS_VERSION;
#ifdef DRS_WITH_CUDA
  module.attr("built_with_cuda") = true;
#else
  module.attr("built_with_cuda") = false;
#endif
  module.attr("cuda_archs") = std::string(DRS_CUDA_ARCHS);
}
