/* Row kernels of the CPU backend: one table per element type (cpu/kernels.c). */
#ifndef BNCORE_CPU_CPU_H
#define BNCORE_CPU_CPU_H

#include <math.h>

#include "../backend.h"

/* Elements per piece of a row: pieces are reduced two-pass while in L1, then merged. */
#define BN_PIECE 2048
/* Independent accumulators per piece: enough to hide add latency in wide vectors. */
#define BN_LANES 32
#define BN_BLOCK_BYTES 8192 /* bytes of x per block of short rows in the fused row kernels */

/* One row of the canonical problem (the innermost dim at fixed outer indices), or a
 * tile of m such rows along the next dim, whose strides are rx, rdy, ro, rg, rp. */
typedef struct bn_row_t {
  int64_t m;     /* rows in the tile (1 for a single row) */
  int64_t rx, rdy, ro, rg, rp; /* strides between the tile's rows */
  int64_t n;
  const char *x;
  int64_t sx;
  const char *dy;
  int64_t sdy;
  char *out;
  int64_t so;
  int64_t g, sg; /* statistic-group index of element 0, and its stride along the row */
  int64_t p, sp; /* parameter index of element 0, and its stride along the row */
} bn_row_t;

/* Which accumulator a backward sum goes to. */
enum { BN_TARGET_GROUP = 0, BN_TARGET_PARAM = 1 };

/* Row bodies are inlined into the tile kernels (a call per row cost more than a short row). */
#if defined(__GNUC__)
#define BN_INLINE static inline __attribute__((always_inline))
#else
#define BN_INLINE static inline
#endif

/* What the CPU kernels read: the neutral numbers plus compute-type copies made for them. */
typedef struct bn_cpu_coef_t {
  bn_coef_t c;
  const void *weight_ct;      /* weight in the compute type (float, or double for float64), or NULL */
  const void *bias_ct;        /* bias likewise */
  const void *gmean_ct, *gscale_ct, *gshift_ct, *gslope_ct; /* per-group coefficients, rows across groups */
} bn_cpu_coef_t;

typedef struct bn_kernels_t {
  /* compute-type lanes per piece, pieces merged in double */
  void (*moments_row)(const bn_row_t *row, double *mean, double *m2);
  void (*moments_cols)(const bn_row_t *row, int64_t rows, int64_t rs, double *tmean, double *tm2, void *scratch);
  /* tiles: every row of `tile`; row r's targets start at t + r*rt */
  void (*grad_sums)(const bn_row_t *tile, const bn_cpu_coef_t *k, int target, int64_t t, int64_t ts, int64_t rt,
                    double *acc_a, double *acc_b);
  void (*apply_forward)(const bn_row_t *tile, const bn_cpu_coef_t *k);
  /* the fused forward of a tile of one-row groups: statistics into c (finished for groups of n), then apply */
  void (*forward_rows)(const bn_row_t *tile, const bn_cpu_coef_t *k, bn_coef_t *c, double n);
  /* the fused forward of one group made of the tile's rows (group index tile->g) */
  void (*forward_group)(const bn_row_t *tile, const bn_cpu_coef_t *k, bn_coef_t *c, double n);
  void (*apply_backward)(const bn_row_t *tile, const bn_cpu_coef_t *k);
  /* the fused backward of a tile of one-row groups with parameters along the row: group sums
   * (training), compute-type parameter partials (pa, pb; NULL: none), dx by `apply` (NULL: none) */
  void (*backward_rows)(const bn_row_t *tile, const bn_cpu_coef_t *k, const bn_cpu_coef_t *apply, int training,
                        void *pa, void *pb);
  /* per-group coefficients (mean, scale, shift | mean, k1, c1, k2) in the compute type */
  void (*group_coefs)(const bn_coef_t *c, int64_t ngroups, int backward, void *mean, void *scale, void *shift,
                      void *slope);
  void (*to_compute)(const double *src, int64_t n, void *dst);
  /* parameter sums of a one-group row into compute-type slab partials, and their merge */
  void (*param_sums_ct)(const bn_row_t *row, const bn_cpu_coef_t *k, void *pa, void *pb);
  void (*add_to_double)(const void *src, int64_t n, double *dst);
  /* the gradient through a forward epilogue: out = dy (where the forward's y > 0 with relu) */
  void (*mask_grad)(const bn_row_t *tile, int relu);
  size_t ct_size; /* bytes of one compute-type value */
} bn_kernels_t;

/* The kernel tables of the level picked at load (cpu/kernels.c), and that level's name. */
const bn_kernels_t *bn_cpu_kernels(bn_dtype_t dt);

#endif /* BNCORE_CPU_CPU_H */
