// The same header from C++: layer norm forward and backward on std::vector data,
// checked against a reference computed here. Exit status 0 when they agree.
//
//   c++ train_step.cpp $(python -m bncore --cflags) $(python -m bncore --libs) -o train_step_cpp
#include <bncore/bncore.h>

#include <cmath>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

// Turns a bncore status into an exception carrying the library's message.
void check(bn_status_t status, const char *what) {
  if (status != BN_STATUS_SUCCESS)
    throw std::runtime_error(std::string(what) + ": " + bn_status_string(status) + " (" + bn_last_error() + ")");
}

DLTensor view(std::vector<double> &data, std::vector<int64_t> &shape) {
  DLTensor t{};
  t.data = data.data();
  t.device = {kDLCPU, 0};
  t.ndim = static_cast<int32_t>(shape.size());
  t.dtype = {kDLFloat, 64, 1};
  t.shape = shape.data();
  return t;
}

}  // namespace

int main() {
  const int64_t rows = 16, cols = 32;
  std::vector<int64_t> shape{rows, cols}, pshape{cols}, sshape{rows};
  std::vector<double> x(rows * cols), y(x.size()), dy(x.size()), dx(x.size());
  std::vector<double> w(cols), b(cols), mean(rows), rstd(rows), dw(cols), db(cols);
  for (size_t i = 0; i < x.size(); i++) x[i] = std::sin(0.37 * i) * 4.0 + 100.0, dy[i] = std::cos(0.11 * i);
  for (int64_t j = 0; j < cols; j++) w[j] = 1.0 + 0.01 * j, b[j] = -0.02 * j;
  try {
    bn_norm_desc_t desc;
    check(bn_norm_desc_init_layer(&desc, 2, 1, 1e-5), "bn_norm_desc_init_layer");
    DLTensor tx = view(x, shape), ty = view(y, shape), tdy = view(dy, shape), tdx = view(dx, shape);
    DLTensor tw = view(w, pshape), tb = view(b, pshape), tm = view(mean, sshape), tr = view(rstd, sshape);
    DLTensor tdw = view(dw, pshape), tdb = view(db, pshape);
    check(bn_norm_forward(NULL, &desc, &tx, &tw, &tb, NULL, NULL, 0, nullptr, nullptr, &ty, &tm, &tr), "bn_norm_forward");
    check(bn_norm_backward(NULL, &desc, &tx, &tdy, &tw, &tm, &tr, &tdx, &tdw, &tdb), "bn_norm_backward");
  } catch (const std::exception &e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  double worst = 0.0;
  for (int64_t r = 0; r < rows; r++) {
    double mu = 0.0, var = 0.0, g1 = 0.0, g2 = 0.0;
    for (int64_t j = 0; j < cols; j++) mu += x[r * cols + j] / cols;
    for (int64_t j = 0; j < cols; j++) var += (x[r * cols + j] - mu) * (x[r * cols + j] - mu) / cols;
    const double rs = 1.0 / std::sqrt(var + 1e-5);
    for (int64_t j = 0; j < cols; j++) {
      const double xh = (x[r * cols + j] - mu) * rs, g = dy[r * cols + j] * w[j];
      worst = std::fmax(worst, std::fabs(y[r * cols + j] - (xh * w[j] + b[j])));
      g1 += g, g2 += g * xh;
    }
    for (int64_t j = 0; j < cols; j++) {
      const double xh = (x[r * cols + j] - mu) * rs;
      const double want = rs * (dy[r * cols + j] * w[j] - g1 / cols - xh * g2 / cols);
      worst = std::fmax(worst, std::fabs(dx[r * cols + j] - want));
    }
  }
  std::printf("bncore %s from C++: layer norm (%lld, %lld) float64, max difference %.2e\n", bn_version_string(),
              static_cast<long long>(rows), static_cast<long long>(cols), worst);
  return worst < 1e-10 ? 0 : 1;
}
