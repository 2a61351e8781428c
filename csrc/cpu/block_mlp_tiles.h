// The CPU block kernels' tile code, compiled once per ISA level: block_mlp.cpp
// includes this file inside a namespace per level (at_avx512, at_avx2,
// at_baseline) with `#pragma GCC target` set to that level, so that every
// function here, the lambdas the drivers hand to at::parallel_for included,
// is compiled for it. The helpers it inlines (block_math.h, reductions.h, the
// conversions in block_mlp.cpp) are generic always-inline functions, so each
// copy gets them compiled for its own level too. See isa.h for how a call
// picks its copy.
//
// No include guard, on purpose: it is included several times. No #include
// either: everything it uses is declared in block_mlp.cpp before it.

// ---------------------------------------------------------------------------
// Elementwise tile kernels. "rows": channel-major tile, the per-channel
// coefficient is per row; "cols": token-major tile, per column.
// ---------------------------------------------------------------------------

// z = A x + B for a channel-major tile: rows c, x row stride ldx. IO: the
// activations' type (x, out, g, dz), S the GEMM operands' (z, h, weights):
// the same but for the mixed-precision instantiation (fp32 IO, bf16 GEMMs).
template <typename S, typename IO = S>
void prologue_rows(const IO* __restrict x, int64_t ldx,
                                       const acc_t<S>* __restrict A,
                                       const acc_t<S>* __restrict B, int64_t rows,
                                       int64_t L, S* __restrict z, int64_t ldz) {
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t<S> ar = A[r], br = B[r];
    const IO* __restrict xr = x + r * ldx;
    S* __restrict zr = z + r * ldz;
    for (int64_t j = 0; j < L; ++j) zr[j] = from_acc<S>(block_z(ar, br, to_acc(xr[j])));
  }
}

// z = A x + B for a token-major tile: L rows of C contiguous channels.
template <typename S, typename IO = S>
void prologue_cols(const IO* __restrict x, const acc_t<S>* __restrict A,
                                       const acc_t<S>* __restrict B, int64_t L, int64_t C,
                                       S* __restrict z) {
  for (int64_t j = 0; j < L; ++j) {
    const IO* __restrict xr = x + j * C;
    S* __restrict zr = z + j * C;
    for (int64_t c = 0; c < C; ++c) zr[c] = from_acc<S>(block_z(A[c], B[c], to_acc(xr[c])));
  }
}

// h = GELU(u + b1) over a channel-major hidden tile [Hd, L] (bias per row).
// u and h may be the same buffer (fp32): each element is read, then written.
// When u_out is set, u + b1 is also stored there (row stride ld_out).
template <typename S, bool kStoreU>
void gelu_rows(acc_t<S>* __restrict u, const acc_t<S>* __restrict b1,
                                   int64_t rows, int64_t L, S* __restrict h,
                                   S* __restrict u_out, int64_t ld_out) {
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t<S> br = b1[r];
    acc_t<S>* __restrict ur = u + r * L;
    // In place when S is the accumulation type (h is then ignored): one
    // pointer, so the compiler needs no runtime alias check.
    S* __restrict hr = kSameType<S> ? reinterpret_cast<S*>(ur) : h + r * L;
    if constexpr (kStoreU) {
      S* __restrict uo = u_out + r * ld_out;
      for (int64_t j = 0; j < L; ++j) {
        const acc_t<S> v = ur[j] + br;
        uo[j] = from_acc<S>(v);
        if constexpr (kSameType<S>) ur[j] = gelu(v); else hr[j] = from_acc<S>(gelu(v));
      }
    } else {
      for (int64_t j = 0; j < L; ++j) {
        if constexpr (kSameType<S>) ur[j] = gelu(ur[j] + br);
        else hr[j] = from_acc<S>(gelu(ur[j] + br));
      }
    }
  }
}

// Same over a token-major hidden tile [L, Hd] (bias per column); u_out rows
// are contiguous (channels_last u has row stride Hd).
template <typename S, bool kStoreU>
void gelu_cols(acc_t<S>* __restrict u, const acc_t<S>* __restrict b1,
                                   int64_t L, int64_t Hd, S* __restrict h,
                                   S* __restrict u_out) {
  for (int64_t j = 0; j < L; ++j) {
    acc_t<S>* __restrict ur = u + j * Hd;
    S* __restrict hr = kSameType<S> ? reinterpret_cast<S*>(ur) : h + j * Hd;
    if constexpr (kStoreU) {
      S* __restrict uo = u_out + j * Hd;
      for (int64_t c = 0; c < Hd; ++c) {
        const acc_t<S> v = ur[c] + b1[c];
        uo[c] = from_acc<S>(v);
        if constexpr (kSameType<S>) ur[c] = gelu(v); else hr[c] = from_acc<S>(gelu(v));
      }
    } else {
      for (int64_t c = 0; c < Hd; ++c) {
        if constexpr (kSameType<S>) ur[c] = gelu(ur[c] + b1[c]);
        else hr[c] = from_acc<S>(gelu(ur[c] + b1[c]));
      }
    }
  }
}

// Epilogue of a channel-major tile: out = a x + b + l2 (acc + b2), rounded to
// S; `acc` is overwritten with the rounded values (the moments below are of
// exactly what was stored, i.e. what the next block will read).
template <typename S, typename IO = S>
void epilogue_rows(const IO* __restrict x, int64_t ld, const acc_t<S>* a,
                                       const acc_t<S>* b, const acc_t<S>* l2,
                                       const acc_t<S>* b2, int64_t rows, int64_t L,
                                       acc_t<S>* __restrict acc, int64_t ldacc,
                                       IO* __restrict out) {
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t<S> ar = a[r], br = b[r], lr = l2[r], b2r = b2[r];
    const IO* __restrict xr = x + r * ld;
    IO* __restrict outr = out + r * ld;
    acc_t<S>* __restrict accr = acc + r * ldacc;
    for (int64_t j = 0; j < L; ++j) {
      const IO v = from_acc<IO>(block_out(ar, br, lr, b2r, to_acc(xr[j]), accr[j]));
      outr[j] = v;
      accr[j] = to_acc(v);
    }
  }
}

template <typename S, typename IO = S>
void epilogue_cols(const IO* __restrict x, const acc_t<S>* __restrict a,
                                       const acc_t<S>* __restrict b,
                                       const acc_t<S>* __restrict l2,
                                       const acc_t<S>* __restrict b2, int64_t L, int64_t C,
                                       acc_t<S>* __restrict acc, IO* __restrict out) {
  for (int64_t j = 0; j < L; ++j) {
    const IO* __restrict xr = x + j * C;
    IO* __restrict outr = out + j * C;
    acc_t<S>* __restrict accr = acc + j * C;
    for (int64_t c = 0; c < C; ++c) {
      const IO v = from_acc<IO>(block_out(a[c], b[c], l2[c], b2[c], to_acc(xr[c]), accr[c]));
      outr[c] = v;
      accr[c] = to_acc(v);
    }
  }
}

// Moments of each row of a [rows, L] buffer and of each column of a [L, C]
// one: the moments kernel's corrected two-pass scheme (reductions.h), so a
// large common offset does not cancel.
template <typename A>
void row_moments(const A* __restrict v, int64_t ldv, int64_t rows,
                                     int64_t L, A* __restrict mean, A* __restrict m2) {
  for (int64_t r = 0; r < rows; ++r) {
    const Moments<A> mo = cpu::contiguous_moments<A>(v + r * ldv, L);
    mean[r] = mo.mean;
    m2[r] = mo.m2;
  }
}

// (`scratch`: 3 C values.)
template <typename A>
void col_moments(const A* __restrict v, int64_t L, int64_t C,
                                     A* __restrict scratch, A* __restrict mean,
                                     A* __restrict m2) {
  cpu::column_moments<A>(v, L, C, scratch, [&](int64_t c, const Moments<A>& mo) {
    mean[c] = mo.mean;
    m2[c] = mo.m2;
  });
}

// Backward: from u (+ b1 when recomputed) to h = GELU(u) and d = GELU'(u).
// In place: `ud` holds u on entry and GELU'(u) on exit.
template <typename S>
void gelu_grad_rows_inplace(acc_t<S>* ud, const acc_t<S>* __restrict b1,
                                                int64_t rows, int64_t L, S* __restrict h) {
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t<S> br = b1[r];
    acc_t<S>* ur = ud + r * L;
    S* __restrict hr = h + r * L;
    for (int64_t j = 0; j < L; ++j) {
      acc_t<S> hv, dv;
      gelu_and_grad<acc_t<S>>(ur[j] + br, hv, dv);
      hr[j] = from_acc<S>(hv);
      ur[j] = dv;
    }
  }
}

template <typename S>
void gelu_grad_cols_inplace(acc_t<S>* ud, const acc_t<S>* __restrict b1,
                                                int64_t L, int64_t Hd, S* __restrict h) {
  for (int64_t j = 0; j < L; ++j) {
    acc_t<S>* ur = ud + j * Hd;
    S* __restrict hr = h + j * Hd;
    for (int64_t c = 0; c < Hd; ++c) {
      acc_t<S> hv, dv;
      gelu_and_grad<acc_t<S>>(ur[c] + b1[c], hv, dv);
      hr[c] = from_acc<S>(hv);
      ur[c] = dv;
    }
  }
}

// From a saved u (bias included) with row stride ldu to h and d (dense [rows, L]).
template <typename S>
void gelu_grad_from_saved(const S* __restrict u, int64_t ldu, int64_t rows,
                                              int64_t L, S* __restrict h,
                                              acc_t<S>* __restrict d, int64_t ldo) {
  for (int64_t r = 0; r < rows; ++r) {
    const S* __restrict ur = u + r * ldu;
    S* __restrict hr = h + r * ldo;
    acc_t<S>* __restrict dr = d + r * ldo;
    for (int64_t j = 0; j < L; ++j) {
      acc_t<S> hv, dv;
      gelu_and_grad<acc_t<S>>(to_acc(ur[j]), hv, dv);
      hr[j] = from_acc<S>(hv);
      dr[j] = dv;
    }
  }
}

// v rounded to S, and with kLo the rounding's remainder v - hi rounded to S
// as well: a two-term (hi + lo) operand whose two GEMMs give the product to
// ~2^-16 relative in bf16 (see kCompensate in mlp_backward_kernel).
template <typename S, bool kLo>
RIFORMER_INLINE void store_split(acc_t<S> v, S& hi, S* lo) {
  const S h = from_acc<S>(v);
  hi = h;
  if constexpr (kLo) *lo = from_acc<S>(v - to_acc(h));
}

// dO = l2 g for a channel-major tile (g row stride ldg) (kLo: also its
// remainder into lo, same layout) ...
template <typename S, typename IO = S, bool kLo = false>
void scale_rows(const IO* __restrict g, int64_t ldg,
                                    const acc_t<S>* __restrict l2, int64_t rows, int64_t L,
                                    S* __restrict out, int64_t ldo, S* __restrict lo = nullptr) {
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t<S> lr = l2[r];
    const IO* __restrict gr = g + r * ldg;
    S* __restrict o = out + r * ldo;
    S* __restrict ol = kLo ? lo + r * ldo : nullptr;
    for (int64_t j = 0; j < L; ++j) store_split<S, kLo>(lr * to_acc(gr[j]), o[j], ol + j);
  }
}

// ... and for a token-major one.
template <typename S, typename IO = S, bool kLo = false>
void scale_cols(const IO* __restrict g, const acc_t<S>* __restrict l2,
                                    int64_t L, int64_t C, S* __restrict out,
                                    S* __restrict lo = nullptr) {
  for (int64_t j = 0; j < L; ++j)
    for (int64_t c = 0; c < C; ++c)
      store_split<S, kLo>(l2[c] * to_acc(g[j * C + c]), out[j * C + c],
                          kLo ? lo + j * C + c : nullptr);
}

// du = dh * GELU'(u) over a channel-major tile, db1 += row sums of du.
// du may alias dh (fp32: computed in place). kLo (bf16 only): also du's
// rounding remainder into lo (same layout as du), see store_split.
template <typename S, bool kLo = false>
void hidden_grad_rows(acc_t<S>* __restrict dh, const acc_t<S>* __restrict d,
                                          int64_t rows, int64_t L, S* __restrict du,
                                          acc_t<S>* __restrict db1, S* __restrict lo = nullptr) {
  using A = acc_t<S>;
  static_assert(!kLo || !kSameType<S>, "a remainder only where du is rounded");
  for (int64_t r = 0; r < rows; ++r) {
    A* __restrict dhr = dh + r * L;
    const A* __restrict dr = d + r * L;
    S* __restrict dur = kSameType<S> ? reinterpret_cast<S*>(dhr) : du + r * L;
    S* __restrict lor = kLo ? lo + r * L : nullptr;
    A lane[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= L; i += kLanes)
      for (int64_t q = 0; q < kLanes; ++q) {
        const A v = dhr[i + q] * dr[i + q];
        if constexpr (kSameType<S>) dhr[i + q] = v;
        else store_split<S, kLo>(v, dur[i + q], lor + i + q);
        lane[q] += v;
      }
    for (; i < L; ++i) {
      const A v = dhr[i] * dr[i];
      if constexpr (kSameType<S>) dhr[i] = v;
      else store_split<S, kLo>(v, dur[i], lor + i);
      lane[i % kLanes] += v;
    }
    db1[r] += sum_lanes(lane);
  }
}

template <typename S, bool kLo = false>
void hidden_grad_cols(acc_t<S>* __restrict dh, const acc_t<S>* __restrict d,
                                          int64_t L, int64_t Hd, S* __restrict du,
                                          acc_t<S>* __restrict db1, S* __restrict lo = nullptr) {
  using A = acc_t<S>;
  static_assert(!kLo || !kSameType<S>, "a remainder only where du is rounded");
  for (int64_t j = 0; j < L; ++j) {
    A* __restrict dhr = dh + j * Hd;
    const A* __restrict dr = d + j * Hd;
    S* __restrict dur = kSameType<S> ? reinterpret_cast<S*>(dhr) : du + j * Hd;
    S* __restrict lor = kLo ? lo + j * Hd : nullptr;
    for (int64_t c = 0; c < Hd; ++c) {
      const A v = dhr[c] * dr[c];
      if constexpr (kSameType<S>) dhr[c] = v;
      else store_split<S, kLo>(v, dur[c], lor + c);
      db1[c] += v;
    }
  }
}

// Per-channel sums of a channel-major tile: sums[0..3][c] = sum_t g,
// g (x - m), dz, dz (x - m); also stores dz (acc buffer, dense) to its
// tensor (row stride ld).
template <typename S, typename IO = S>
void tile_sums_rows(const IO* __restrict g, const IO* __restrict x,
                                        const acc_t<S>* __restrict dzacc, int64_t ld,
                                        int64_t ldacc, const acc_t<S>* __restrict mean,
                                        int64_t rows, int64_t L, IO* __restrict dz,
                                        acc_t<S>* __restrict sums) {
  using A = acc_t<S>;
  for (int64_t r = 0; r < rows; ++r) {
    const IO* __restrict gr = g + r * ld;
    const IO* __restrict xr = x + r * ld;
    const A* __restrict zr = dzacc + r * ldacc;
    IO* __restrict dzr = dz + r * ld;
    const A m = mean[r];
    A sg[kLanes] = {}, sgx[kLanes] = {}, sd[kLanes] = {}, sdx[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= L; i += kLanes)
      for (int64_t q = 0; q < kLanes; ++q) {
        const A gv = to_acc(gr[i + q]);
        const A xc = to_acc(xr[i + q]) - m;
        const IO dzs = from_acc<IO>(zr[i + q]);
        const A dv = to_acc(dzs);
        dzr[i + q] = dzs;
        sg[q] += gv;
        sgx[q] += gv * xc;
        sd[q] += dv;
        sdx[q] += dv * xc;
      }
    for (; i < L; ++i) {
      const A gv = to_acc(gr[i]);
      const A xc = to_acc(xr[i]) - m;
      const IO dzs = from_acc<IO>(zr[i]);
      const A dv = to_acc(dzs);
      dzr[i] = dzs;
      const int64_t q = i % kLanes;
      sg[q] += gv;
      sgx[q] += gv * xc;
      sd[q] += dv;
      sdx[q] += dv * xc;
    }
    sums[0 * rows + r] = sum_lanes(sg);
    sums[1 * rows + r] = sum_lanes(sgx);
    sums[2 * rows + r] = sum_lanes(sd);
    sums[3 * rows + r] = sum_lanes(sdx);
  }
}

template <typename S, typename IO = S>
void tile_sums_cols(const IO* __restrict g, const IO* __restrict x,
                                        const acc_t<S>* __restrict dzacc,
                                        const acc_t<S>* __restrict mean, int64_t L, int64_t C,
                                        IO* __restrict dz, acc_t<S>* __restrict sums) {
  using A = acc_t<S>;
  A* __restrict sg = sums;
  A* __restrict sgx = sums + C;
  A* __restrict sd = sums + 2 * C;
  A* __restrict sdx = sums + 3 * C;
  for (int64_t c = 0; c < 4 * C; ++c) sums[c] = 0;
  for (int64_t j = 0; j < L; ++j)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t e = j * C + c;
      const A gv = to_acc(g[e]);
      const A xc = to_acc(x[e]) - mean[c];
      const IO dzs = from_acc<IO>(dzacc[e]);
      const A dv = to_acc(dzs);
      dz[e] = dzs;
      sg[c] += gv;
      sgx[c] += gv * xc;
      sd[c] += dv;
      sdx[c] += dv * xc;
    }
}

// From GH = G H^T of a tile ([C, Hd]): dW2 += l2 (.) GH (row-scaled) and
// sum_t g o = sum_h W2[c, h] GH[c, h] + b2_c sum_t g. Using G rather than
// dO = l2 G keeps sum g o exact where a drop-path factor zeroes l2.
template <typename S>
void weight2_grad(const acc_t<S>* __restrict gh, const S* __restrict w2,
                                      const acc_t<S>* __restrict l2,
                                      const acc_t<S>* __restrict b2,
                                      const acc_t<S>* __restrict sg, int64_t C, int64_t Hd,
                                      acc_t<S>* __restrict dw2, acc_t<S>* __restrict sgo) {
  using A = acc_t<S>;
  for (int64_t c = 0; c < C; ++c) {
    const A* __restrict ghr = gh + c * Hd;
    const S* __restrict wr = w2 + c * Hd;
    A* __restrict dwr = dw2 + c * Hd;
    const A lc = l2[c];
    A lane[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= Hd; i += kLanes)
      for (int64_t q = 0; q < kLanes; ++q) {
        dwr[i + q] += lc * ghr[i + q];
        lane[q] += to_acc(wr[i + q]) * ghr[i + q];
      }
    for (; i < Hd; ++i) {
      dwr[i] += lc * ghr[i];
      lane[i % kLanes] += to_acc(wr[i]) * ghr[i];
    }
    sgo[c] = sum_lanes(lane) + b2[c] * sg[c];
  }
}

// dst[c, r] = src[r, c] for a [rows, cols] block (row strides lds, ldd): the
// GEMMs take no transposed operands, so the kernels transpose the small ones
// (z and g tiles, C x L values) rather than the 4C x L hidden tiles. D: the
// destination type (the mixed instantiation transposes fp32 g into bf16).
template <typename S, typename D = S>
void transpose_block(const S* __restrict src, int64_t lds, int64_t rows, int64_t cols,
                     D* __restrict dst, int64_t ldd) {
  constexpr int64_t kB = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += kB)
    for (int64_t c0 = 0; c0 < cols; c0 += kB) {
      const int64_t r1 = std::min(rows, r0 + kB), c1 = std::min(cols, c0 + kB);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) dst[c * ldd + r] = convert_to<D>(src[r * lds + c]);
    }
}

// sum_t g (o + b2) per channel of a channel-major segment (o = W2 h before
// its bias, row stride ldo; g row stride ldg) ...
template <typename S, typename IO = S>
void sum_g_o_rows(const IO* __restrict g, int64_t ldg,
                                      const acc_t<S>* __restrict o, int64_t ldo,
                                      const acc_t<S>* __restrict b2, int64_t rows, int64_t L,
                                      acc_t<S>* __restrict sgo) {
  using A = acc_t<S>;
  for (int64_t r = 0; r < rows; ++r) {
    const IO* __restrict gr = g + r * ldg;
    const A* __restrict orow = o + r * ldo;
    const A br = b2[r];
    A lane[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= L; i += kLanes)
      for (int64_t q = 0; q < kLanes; ++q) lane[q] += to_acc(gr[i + q]) * (orow[i + q] + br);
    for (; i < L; ++i) lane[i % kLanes] += to_acc(gr[i]) * (orow[i] + br);
    sgo[r] = sum_lanes(lane);
  }
}

// ... and of a token-major one ([L, C], both row stride C).
template <typename S, typename IO = S>
void sum_g_o_cols(const IO* __restrict g, const acc_t<S>* __restrict o,
                                      const acc_t<S>* __restrict b2, int64_t L, int64_t C,
                                      acc_t<S>* __restrict sgo) {
  for (int64_t c = 0; c < C; ++c) sgo[c] = 0;
  for (int64_t j = 0; j < L; ++j)
    for (int64_t c = 0; c < C; ++c) sgo[c] += to_acc(g[j * C + c]) * (o[j * C + c] + b2[c]);
}

// weight2_grad for the transposed product GHT = (G H^T)^T, [Hd, C] (NCHW):
// dW2T[h, c] += l2_c GHT[h, c]; sgo[c] = sum_h W2T[h, c] GHT[h, c] + b2_c sg_c.
template <typename S>
void weight2_grad_t(const acc_t<S>* __restrict ght,
                                        const S* __restrict w2t,
                                        const acc_t<S>* __restrict l2,
                                        const acc_t<S>* __restrict b2,
                                        const acc_t<S>* __restrict sg, int64_t C, int64_t Hd,
                                        acc_t<S>* __restrict dw2t, acc_t<S>* __restrict sgo) {
  for (int64_t c = 0; c < C; ++c) sgo[c] = 0;
  for (int64_t h = 0; h < Hd; ++h) {
    const acc_t<S>* __restrict gr = ght + h * C;
    const S* __restrict wr = w2t + h * C;
    acc_t<S>* __restrict dr = dw2t + h * C;
    for (int64_t c = 0; c < C; ++c) {
      dr[c] += l2[c] * gr[c];
      sgo[c] += to_acc(wr[c]) * gr[c];
    }
  }
  for (int64_t c = 0; c < C; ++c) sgo[c] += b2[c] * sg[c];
}

// Phase 2: dx = P g + Q dz + R (x - m) + S for `rows` channel rows of length
// L (one sample, NCHW) ...
template <typename S>
void input_grad_rows(const S* __restrict g, const S* __restrict dz,
                                         const S* __restrict x, const acc_t<S>* __restrict m,
                                         const acc_t<S>* __restrict P,
                                         const acc_t<S>* __restrict Q,
                                         const acc_t<S>* __restrict R,
                                         const acc_t<S>* __restrict Sc, int64_t rows,
                                         int64_t L, S* __restrict dx) {
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t<S> p = P[r], q = Q[r], rr = R[r], s = Sc[r], mr = m[r];
    const int64_t o = r * L;
    for (int64_t j = 0; j < L; ++j)
      dx[o + j] = from_acc<S>(block_input_grad(p, q, rr, s, to_acc(g[o + j]),
                                               to_acc(dz[o + j]), to_acc(x[o + j]) - mr));
  }
}

// ... and for L tokens of C channels (channels_last).
template <typename S>
void input_grad_cols(const S* __restrict g, const S* __restrict dz,
                                         const S* __restrict x, const acc_t<S>* __restrict m,
                                         const acc_t<S>* __restrict P,
                                         const acc_t<S>* __restrict Q,
                                         const acc_t<S>* __restrict R,
                                         const acc_t<S>* __restrict Sc, int64_t L, int64_t C,
                                         S* __restrict dx) {
  for (int64_t j = 0; j < L; ++j)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t e = j * C + c;
      dx[e] = from_acc<S>(block_input_grad(P[c], Q[c], R[c], Sc[c], to_acc(g[e]),
                                           to_acc(dz[e]), to_acc(x[e]) - m[c]));
    }
}

// ---------------------------------------------------------------------------
// Tile GEMMs, one definition for both layouts. A tile buffer of `rows`
// channels (C or Hd) and L tokens is [rows, L] channel-major (NCHW) or
// [L, rows] token-major (channels_last), and the two layouts run the same
// products, transposed: channel-major Y[M, L] = Wm[M, K] X[K, L], token-major
// Y[L, M] = X[L, K] Wm^T[K, M]. So each product of the kernels is written once,
// given Wm and its transposed copy WmT (the one token-major GEMMs read).
// ---------------------------------------------------------------------------
// Wm [M, K] or its transposed copy WmT [K, M] may be null (add_transposed_weights
// makes copies only for brgemm); the GEMM then reads the other one transposed.
// accumulate: Y += the product instead of Y = it.
template <typename S, typename Acc>
void tile_gemm(bool cl, int64_t L, int64_t M, int64_t K, const S* Wm, const S* WmT,
               const S* X, Acc* Y, bool accumulate = false) {
  const Acc beta = accumulate ? Acc(1) : Acc(0);
  if (!cl) {
    if (Wm != nullptr)
      blas::gemm_nn(M, L, K, Wm, K, X, L, Y, L, accumulate);
    else
      blas::gemm(true, false, M, L, K, Acc(1), WmT, M, X, L, beta, Y, L);
  } else {
    if (WmT != nullptr)
      blas::gemm_nn(L, M, K, X, K, WmT, M, Y, M, accumulate);
    else
      blas::gemm(false, true, L, M, K, Acc(1), X, K, Wm, K, beta, Y, M);
  }
}

// Weight-gradient accumulation over a tile's tokens, G (+)= P Q^T, for a tile
// buffer P of M channels and the transposed copy QT of one of N channels
// (tile_transpose). G is kept in the orientation the layout's GEMM produces:
// [M, N] channel-major, [N, M] token-major.
template <typename S, typename Acc>
void tile_weight_grad(bool cl, int64_t L, int64_t M, int64_t N, const S* P, const S* QT,
                      Acc* G, bool accumulate) {
  if (!cl)
    blas::gemm_nn(M, N, L, P, L, QT, N, G, N, accumulate);
  else
    blas::gemm_nn(N, M, L, QT, L, P, M, G, M, accumulate);
}

// The transposed copy of a tile buffer of `rows` channels ([L, rows] from
// [rows, L] channel-major; [rows, L] from [L, rows] token-major).
template <typename S>
void tile_transpose(bool cl, int64_t L, int64_t rows, const S* src, S* dst) {
  if (!cl)
    transpose_block<S>(src, L, rows, L, dst, rows);
  else
    transpose_block<S>(src, rows, L, rows, dst, L);
}


template <typename S, typename IO = S>
void mlp_forward_kernel(const ForwardArgs& f, at::Tensor& out, bool emit_moments,
                        at::Tensor& out_mean, at::Tensor& out_var, at::Tensor* u_out) {
  using Acc = acc_t<S>;
  const int64_t N = f.N, C = f.C, T = f.T, Hd = f.Hd;
  const bool cl = f.channels_last;
  const Tiling tiling =
      make_tiling(N, T, Hd, env_int("RIFORMER_CPU_FWD_HIDDEN", kFwdHiddenElems),
                  env_int("RIFORMER_CPU_MIN_TOKENS", kMinTokens),
                  env_int("RIFORMER_CPU_SHORT_TOKENS", kShortTileTokens),
                  whole_batch_tokens<S>());
  const int64_t K = tiling.per_sample, W = tiling.width();

  const IO* X = f.x.const_data_ptr<IO>();
  IO* OUT = out.mutable_data_ptr<IO>();
  S* UOUT = u_out ? u_out->mutable_data_ptr<S>() : nullptr;
  const Acc *cA = f.A.const_data_ptr<Acc>(), *cB = f.B.const_data_ptr<Acc>();
  const Acc *ca = f.a.const_data_ptr<Acc>(), *cb = f.b.const_data_ptr<Acc>();
  const Acc* cl2 = f.l2.const_data_ptr<Acc>();
  const S* W1 = f.w1.const_data_ptr<S>();
  const S* W2 = f.w2.const_data_ptr<S>();
  const S* W1T = f.w1t.defined() ? f.w1t.const_data_ptr<S>() : nullptr;
  const S* W2T = f.w2t.defined() ? f.w2t.const_data_ptr<S>() : nullptr;
  const Acc* B1 = f.b1.const_data_ptr<Acc>();
  const Acc* B2 = f.b2.const_data_ptr<Acc>();

  // Partial moments of out per (sample, tile of the sample, channel), merged
  // below in tile order.
  std::vector<Acc> pmean(emit_moments ? N * K * C : 0), pm2(emit_moments ? N * K * C : 0);

  for_each_task(tiling.tasks(), [&](int64_t begin, int64_t end) {
    S* Z = thread_scratch<S>(0, C * W);
    Acc* U = thread_scratch<Acc>(1, Hd * W);
    S* Hh = kSameType<S> ? reinterpret_cast<S*>(U) : thread_scratch<S>(2, Hd * W);
    Acc* O = thread_scratch<Acc>(3, C * W);
    // One task on the calling thread: its elementwise passes are split over the threads.
    const bool inline_tile = tiling.tasks() == 1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t L = tiling.task_tokens(task);
      // NCHW: buffers are [rows, L] (row stride L); channels_last: [L, cols].
      tiling.for_each_segment_parallel(task, inline_tile, [&](int64_t n, int64_t, int64_t t0,
                                                              int64_t len, int64_t col) {
        if (!cl)
          prologue_rows<S, IO>(X + n * C * T + t0, T, cA + n * C, cB + n * C, C, len, Z + col,
                               L);
        else
          prologue_cols<S, IO>(X + (n * T + t0) * C, cA + n * C, cB + n * C, len, C, Z + col * C);
      });
      tile_gemm<S>(cl, L, Hd, C, W1, W1T, Z, U);  // u = W1 z
      if (!cl) {
        if (UOUT) {
          tiling.for_each_segment_parallel(task, inline_tile, [&](int64_t n, int64_t,
                                                                  int64_t t0, int64_t len,
                                                                  int64_t col) {
            for (int64_t h = 0; h < Hd; ++h)
              for (int64_t j = 0; j < len; ++j)
                UOUT[(n * Hd + h) * T + t0 + j] = from_acc<S>(U[h * L + col + j] + B1[h]);
          });
        }
        rows_maybe_parallel(inline_tile, Hd, [&](int64_t r0, int64_t r1) {
          gelu_rows<S, false>(U + r0 * L, B1 + r0, r1 - r0, L, Hh + r0 * L, nullptr, 0);
        });
      } else {
        // channels_last: a tile's tokens are consecutive rows of u as well.
        int64_t row0 = -1;
        tiling.for_each_segment(task, [&](int64_t n, int64_t, int64_t t0, int64_t, int64_t col) {
          if (col == 0) row0 = n * T + t0;
        });
        rows_maybe_parallel(inline_tile, L, [&](int64_t j0, int64_t j1) {
          if (UOUT)
            gelu_cols<S, true>(U + j0 * Hd, B1, j1 - j0, Hd, Hh + j0 * Hd,
                               UOUT + (row0 + j0) * Hd);
          else
            gelu_cols<S, false>(U + j0 * Hd, B1, j1 - j0, Hd, Hh + j0 * Hd, nullptr);
        });
      }
      tile_gemm<S>(cl, L, C, Hd, W2, W2T, Hh, O);  // o = W2 h
      tiling.for_each_segment_parallel(task, inline_tile, [&](int64_t n, int64_t k, int64_t t0,
                                                              int64_t len, int64_t col) {
        const int64_t nc = n * C;
        Acc* moment_scratch = thread_scratch<Acc>(4, 3 * C);  // this worker's
        Acc* pmn = emit_moments ? pmean.data() + (n * K + k) * C : nullptr;
        Acc* pm2n = emit_moments ? pm2.data() + (n * K + k) * C : nullptr;
        if (!cl) {
          const int64_t off = n * C * T + t0;
          epilogue_rows<S, IO>(X + off, T, ca + nc, cb + nc, cl2 + nc, B2, C, len, O + col, L,
                           OUT + off);
          if (emit_moments) row_moments<Acc>(O + col, L, C, len, pmn, pm2n);
        } else {
          const int64_t off = (n * T + t0) * C;
          epilogue_cols<S, IO>(X + off, ca + nc, cb + nc, cl2 + nc, B2, len, C, O + col * C,
                           OUT + off);
          if (emit_moments) col_moments<Acc>(O + col * C, len, C, moment_scratch, pmn, pm2n);
        }
      });
    }
  });

  if (!emit_moments) return;
  Acc* MEAN = out_mean.mutable_data_ptr<Acc>();
  Acc* VAR = out_var.mutable_data_ptr<Acc>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) {
      Moments<Acc> acc = moments_empty<Acc>();
      for (int64_t k = 0; k < K; ++k) {
        const int64_t i = (n * K + k) * C + c;
        acc = chan_merge<Acc>(acc, Moments<Acc>{Acc(tiling.segment_tokens(k)), pmean[i], pm2[i]});
      }
      MEAN[n * C + c] = acc.mean;
      VAR[n * C + c] = population_var<Acc>(acc);
    }
}


template <typename S, typename IO = S>
void mlp_backward_kernel(const ForwardArgs& f, const at::Tensor& g, const at::Tensor& mean_t,
                         const at::Tensor* u_saved, at::Tensor& dz, at::Tensor& dw1,
                         at::Tensor& db1, at::Tensor& dw2, at::Tensor& db2, at::Tensor& sums) {
  using Acc = acc_t<S>;
  const int64_t N = f.N, C = f.C, T = f.T, Hd = f.Hd;
  const bool cl = f.channels_last;
  const Tiling tiling =
      make_tiling(N, T, Hd, env_int("RIFORMER_CPU_BWD_HIDDEN", kBwdHiddenElems),
                  env_int("RIFORMER_CPU_MIN_TOKENS", kMinTokens),
                  env_int("RIFORMER_CPU_SHORT_TOKENS", kShortTileTokens),
                  whole_batch_tokens<S>());
  const int64_t K = tiling.per_sample, W = tiling.width();
  const int64_t tasks = tiling.tasks();
  // dW2 and sum g o, two routes. Per segment GH = G H^T, from which both
  // follow with one C x 4C elementwise pass (5 GEMMs per tile in all with
  // recompute); or dW2 += dO H^T over the whole tile and o = W2 h by one more
  // GEMM, sum g o from o (6 GEMMs). The pass costs about a GEMM over ~100
  // tokens, so the GEMM route wins for samples shorter than that (measured,
  // 1 thread: C512@7x7 backward 33 -> 29 ms; C320@14x14 39 vs 43 ms the
  // other way).
  const bool weight2_by_gemm = T < kWeight2GemmBelowTokens;
  // The mixed-precision mode (fp32 activations, bf16 GEMMs: autocast) runs the
  // two GEMMs on the way from g to dz -- dh = W2^T dO and dz = W1^T du -- on
  // two-term operands, dO = hi + lo and du = hi + lo, each term bf16 (two GEMMs
  // each, fp32 accumulation): the products then carry ~2^-16 relative error
  // instead of bf16's 2^-8 in dO and du. Those two roundings dominate the
  // error of dz's per-(n, c) sums, and so of the O(C) gradients (norm, mixer,
  // layer scales), which come from sums with heavy cancellation: measured
  // (C=32, 40 draws per form, fp32 input) the worst draw's error there was
  // 2.4x the reference's under autocast with single bf16 operands (median
  // 0.86x), 1.64x with the two terms (every quantity <= 1.76x).
  // The other GEMMs (u, dW1, dW2, o / G H^T) keep single bf16 operands.
  constexpr bool kCompensate = !std::is_same_v<S, IO>;
  const int64_t group_bytes = (2 * Hd * C + Hd) * int64_t(sizeof(Acc));
  const int64_t groups = std::max<int64_t>(
      1, std::min({tasks, kMaxGroups, kGroupBudgetBytes / std::max<int64_t>(group_bytes, 1)}));

  const IO* X = f.x.const_data_ptr<IO>();
  const IO* G = g.const_data_ptr<IO>();
  const S* US = u_saved ? u_saved->const_data_ptr<S>() : nullptr;
  IO* DZ = dz.mutable_data_ptr<IO>();
  const Acc *cA = f.A.const_data_ptr<Acc>(), *cB = f.B.const_data_ptr<Acc>();
  const Acc* cl2 = f.l2.const_data_ptr<Acc>();
  const Acc* MEAN = mean_t.const_data_ptr<Acc>();
  const S* W1 = f.w1.const_data_ptr<S>();
  const S* W2 = f.w2.const_data_ptr<S>();
  const S* W1T = f.w1t.defined() ? f.w1t.const_data_ptr<S>() : nullptr;
  const S* W2T = f.w2t.defined() ? f.w2t.const_data_ptr<S>() : nullptr;
  const Acc* B1 = f.b1.const_data_ptr<Acc>();
  const Acc* B2 = f.b2.const_data_ptr<Acc>();

  // Group accumulators of the weight gradients, kept in the orientation the
  // layout's GEMMs produce: NCHW dW1 [Hd, C] and dW2^T [Hd, C]; channels_last
  // dW1^T [C, Hd] and dW2 [C, Hd]. The final merge writes dw1 [Hd, C], dw2 [C, Hd].
  // On the calling thread (slots 8..11 of its scratch; workers use 0..7).
  Acc* gw1 = thread_scratch<Acc>(8, groups * Hd * C);
  Acc* gw2 = thread_scratch<Acc>(9, groups * C * Hd);
  Acc* gb1 = thread_scratch<Acc>(10, groups * Hd);
  // Per (sample, tile of the sample): [SG, SGx, Sdz, Sdzx, SGo] x C.
  Acc* tsum = thread_scratch<Acc>(11, N * K * 5 * C);

  for_each_task(groups, [&](int64_t gbegin, int64_t gend) {
    // Slots 0..7 serve the worker buffers; several roles share a slot where
    // one buffer holds [C, W] values and the other is carved after it.
    S* Z = thread_scratch<S>(0, 4 * C * W);
    S* ZT = Z + C * W;      // z transposed (the dW1 GEMM's operand)
    S* GT = ZT + C * W;     // a segment of g transposed (the G H^T GEMM's operand)
    S* DOT = GT + C * W;    // dO transposed (weight2_by_gemm)
    S* DO = thread_scratch<S>(1, (kCompensate ? 2 : 1) * C * W);
    S* DOL = kCompensate ? DO + C * W : nullptr;  // dO's remainder (kCompensate)
    Acc* U = thread_scratch<Acc>(2, Hd * W);  // u, then GELU'(u)
    Acc* DH = thread_scratch<Acc>(3, Hd * W);
    Acc* GH = thread_scratch<Acc>(4, C * Hd);
    Acc* DZT = thread_scratch<Acc>(5, 2 * C * W);
    Acc* O = DZT + C * W;   // W2 h without bias (weight2_by_gemm)
    S* Hh = thread_scratch<S>(6, Hd * W);
    S* DU = kSameType<S> ? reinterpret_cast<S*>(DH) : thread_scratch<S>(7, Hd * W);
    S* DUL = kCompensate ? thread_scratch<S>(12, Hd * W) : nullptr;  // du's remainder
    // One group on the calling thread: its elementwise passes are split over the threads.
    const bool inline_tile = groups == 1;
    for (int64_t grp = gbegin; grp < gend; ++grp) {
      Acc* dW1 = gw1 + grp * Hd * C;
      Acc* dW2 = gw2 + grp * C * Hd;
      Acc* dB1 = gb1 + grp * Hd;
      // The group's first dW1 (and, on the GEMM route, dW2) GEMM overwrites
      // instead of accumulating, so only the G H^T route's dW2 needs zeros.
      if (!weight2_by_gemm) std::fill(dW2, dW2 + C * Hd, Acc(0));
      std::fill(dB1, dB1 + Hd, Acc(0));
      const int64_t tbegin = grp * tasks / groups, tend = (grp + 1) * tasks / groups;
      for (int64_t task = tbegin; task < tend; ++task) {
        const int64_t L = tiling.task_tokens(task);
        const bool accumulate = task != tbegin;
        // z = A x + B and dO = l2 g per segment; u (recomputed or read) per tile.
        tiling.for_each_segment_parallel(task, inline_tile, [&](int64_t n, int64_t,
                                                                int64_t t0, int64_t len,
                                                                int64_t col) {
          const int64_t nc = n * C;
          if (!cl) {
            const int64_t off = n * C * T + t0;
            prologue_rows<S, IO>(X + off, T, cA + nc, cB + nc, C, len, Z + col, L);
            scale_rows<S, IO, kCompensate>(G + off, T, cl2 + nc, C, len, DO + col, L,
                                           kCompensate ? DOL + col : nullptr);
            if (US) {
              gelu_grad_from_saved<S>(US + n * Hd * T + t0, T, Hd, len, Hh + col, U + col, L);
            }
          } else {
            const int64_t off = (n * T + t0) * C;
            prologue_cols<S, IO>(X + off, cA + nc, cB + nc, len, C, Z + col * C);
            scale_cols<S, IO, kCompensate>(G + off, cl2 + nc, len, C, DO + col * C,
                                           kCompensate ? DOL + col * C : nullptr);
            if (US) {
              gelu_grad_from_saved<S>(US + (n * T + t0) * Hd, Hd, len, Hd, Hh + col * Hd,
                                      U + col * Hd, Hd);
            }
          }
        });
        // The tile's GEMMs (tile_gemm: channel-major Y = Wm X, token-major its
        // transpose); dW1 and dW2 accumulate in the orientation the layout's GEMM
        // produces: NCHW dW1 [Hd, C] and dW2^T [Hd, C], channels_last dW1^T and dW2.
        tile_transpose<S>(cl, L, C, Z, ZT);
        if (!US) {
          tile_gemm<S>(cl, L, Hd, C, W1, W1T, Z, U);  // u = W1 z
          rows_maybe_parallel(inline_tile, !cl ? Hd : L, [&](int64_t r0, int64_t r1) {
            if (!cl)
              gelu_grad_rows_inplace<S>(U + r0 * L, B1 + r0, r1 - r0, L, Hh + r0 * L);
            else
              gelu_grad_cols_inplace<S>(U + r0 * Hd, B1, r1 - r0, Hd, Hh + r0 * Hd);
          });
        }
        tile_gemm<S>(cl, L, Hd, C, W2T, W2, DO, DH);  // dh = W2^T dO
        if constexpr (kCompensate) tile_gemm<S>(cl, L, Hd, C, W2T, W2, DOL, DH, true);
        if (!cl) {
          rows_maybe_parallel(inline_tile, Hd, [&](int64_t r0, int64_t r1) {
            hidden_grad_rows<S, kCompensate>(DH + r0 * L, U + r0 * L, r1 - r0, L, DU + r0 * L,
                                             dB1 + r0, kCompensate ? DUL + r0 * L : nullptr);
          });
        } else {
          // db1 sums over tokens: one pass
          hidden_grad_cols<S, kCompensate>(DH, U, L, Hd, DU, dB1, DUL);
        }
        tile_weight_grad<S>(cl, L, Hd, C, DU, ZT, dW1, accumulate);  // dW1 (+)= dU z^T
        tile_gemm<S>(cl, L, C, Hd, W1T, W1, DU, DZT);                // dz = W1^T dU
        if constexpr (kCompensate) tile_gemm<S>(cl, L, C, Hd, W1T, W1, DUL, DZT, true);
        if (weight2_by_gemm) {
          tile_transpose<S>(cl, L, C, DO, DOT);
          tile_weight_grad<S>(cl, L, Hd, C, Hh, DOT, dW2, accumulate);  // dW2^T (+)= h dO^T
          tile_gemm<S>(cl, L, C, Hd, W2, W2T, Hh, O);                   // o = W2 h
        }
        // Per segment: dz out, the per-(n, c) sums, and GH = G H^T (per sample,
        // since l2 and sum g o are per sample) -> dW2 and sum g o. Segments in
        // parallel only on the GEMM route: the G H^T route accumulates every
        // segment into the one dW2 and shares the GH buffer.
        tiling.for_each_segment_parallel(task, inline_tile && weight2_by_gemm,
                                         [&](int64_t n, int64_t k, int64_t t0, int64_t len,
                                             int64_t col) {
          const int64_t nc = n * C;
          Acc* ts = tsum + (n * K + k) * 5 * C;
          if (!cl) {
            const int64_t off = n * C * T + t0;
            tile_sums_rows<S, IO>(G + off, X + off, DZT + col, T, L, MEAN + nc, C, len, DZ + off,
                              ts);
            if (weight2_by_gemm) {
              sum_g_o_rows<S, IO>(G + off, T, O + col, L, B2, C, len, ts + 4 * C);
              return;
            }
            // GH^T[Hd, C] = H[Hd, len] G^T[len, C]
            transpose_block<IO, S>(G + off, T, C, len, GT, C);
            blas::gemm_nn(Hd, C, len, Hh + col, L, GT, C, GH, C, false);
            weight2_grad_t<S>(GH, W2T, cl2 + nc, B2, ts, C, Hd, dW2, ts + 4 * C);
          } else {
            const int64_t off = (n * T + t0) * C;
            tile_sums_cols<S, IO>(G + off, X + off, DZT + col * C, MEAN + nc, len, C, DZ + off, ts);
            if (weight2_by_gemm) {
              sum_g_o_cols<S, IO>(G + off, O + col * C, B2, len, C, ts + 4 * C);
              return;
            }
            // GH[C, Hd] = G^T[C, len] H[len, Hd]
            transpose_block<IO, S>(G + off, C, len, C, GT, len);
            blas::gemm_nn(C, Hd, len, GT, len, Hh + col * Hd, Hd, GH, Hd, false);
            weight2_grad<S>(GH, W2, cl2 + nc, B2, ts, C, Hd, dW2, ts + 4 * C);
          }
        });
      }
    }
  });

  // Fixed-order merges.
  Acc* DW1 = dw1.mutable_data_ptr<Acc>();
  Acc* DW2 = dw2.mutable_data_ptr<Acc>();
  Acc* DB1 = db1.mutable_data_ptr<Acc>();
  Acc* DB2 = db2.mutable_data_ptr<Acc>();
  Acc* SUMS = sums.mutable_data_ptr<Acc>();
  const int64_t wsize = Hd * C;
  // Sum the groups in group order (into group 0), then write dw1 [Hd, C] and
  // dw2 [C, Hd], transposing (blockwise) the accumulators that the layout's
  // GEMMs produced the other way round: NCHW dW2^T [Hd, C], channels_last
  // dW1^T [C, Hd].
  at::parallel_for(0, wsize, 16384, [&](int64_t b, int64_t e) {
    for (int64_t grp = 1; grp < groups; ++grp) {
      const Acc* g1 = gw1 + grp * wsize;
      const Acc* g2 = gw2 + grp * wsize;
      for (int64_t i = b; i < e; ++i) {
        gw1[i] += g1[i];
        gw2[i] += g2[i];
      }
    }
  });
  if (!cl) {
    std::copy(gw1, gw1 + wsize, DW1);
    transpose_block<Acc>(gw2, C, Hd, C, DW2, Hd);
  } else {
    transpose_block<Acc>(gw1, Hd, C, Hd, DW1, C);
    std::copy(gw2, gw2 + wsize, DW2);
  }
  for (int64_t h = 0; h < Hd; ++h) {
    Acc s = gb1[h];
    for (int64_t grp = 1; grp < groups; ++grp) s += gb1[grp * Hd + h];
    DB1[h] = s;
  }
  for (int64_t n = 0; n < N; ++n)
    for (int64_t q = 0; q < 5; ++q)
      for (int64_t c = 0; c < C; ++c) {
        Acc s = 0;
        for (int64_t k = 0; k < K; ++k) s += tsum[((n * K + k) * 5 + q) * C + c];
        SUMS[(q * N + n) * C + c] = s;
      }
  for (int64_t c = 0; c < C; ++c) {
    Acc s = 0;
    for (int64_t n = 0; n < N; ++n) s += cl2[n * C + c] * SUMS[n * C + c];
    DB2[c] = s;
  }
}


// Phase 2 over the whole tensor, in chunks of about 16K elements fixed by the shape.
template <typename S>
void input_grad_kernel(const at::Tensor& grad_out, const at::Tensor& dz, const at::Tensor& x,
                       const at::Tensor& m, const at::Tensor& p, const at::Tensor& q,
                       const at::Tensor& r, const at::Tensor& s, bool cl, at::Tensor& dx) {
  const int64_t N = x.size(0), C = x.size(1), T = x.size(2) * x.size(3);
  using Acc = acc_t<S>;
  const S *G = grad_out.const_data_ptr<S>(), *D = dz.const_data_ptr<S>(),
                 *X = x.const_data_ptr<S>();
  S* DX = dx.mutable_data_ptr<S>();
  const Acc *M = m.const_data_ptr<Acc>(), *PP = p.const_data_ptr<Acc>(),
            *QQ = q.const_data_ptr<Acc>(), *RR = r.const_data_ptr<Acc>(),
            *SS = s.const_data_ptr<Acc>();
  // Chunks of about 16K elements, fixed by the shape.
  if (!cl) {
    const int64_t rows_per = std::max<int64_t>(1, 16384 / T);
    const int64_t chunks = (N * C + rows_per - 1) / rows_per;
    at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
      for (int64_t ch = b; ch < e; ++ch) {
        const int64_t r0 = ch * rows_per, r1 = std::min(N * C, r0 + rows_per);
        // rows r0..r1 may span samples: coefficients are indexed by row = n * C + c.
        const int64_t o = r0 * T;
        input_grad_rows<S>(G + o, D + o, X + o, M + r0, PP + r0, QQ + r0, RR + r0,
                                  SS + r0, r1 - r0, T, DX + o);
      }
    });
  } else {
    const int64_t tok_per = std::max<int64_t>(1, 16384 / C);
    const int64_t per_sample = (T + tok_per - 1) / tok_per;
    at::parallel_for(0, N * per_sample, 1, [&](int64_t b, int64_t e) {
      for (int64_t ch = b; ch < e; ++ch) {
        const int64_t n = ch / per_sample, t0 = (ch % per_sample) * tok_per;
        const int64_t L = std::min(tok_per, T - t0);
        const int64_t o = (n * T + t0) * C;
        input_grad_cols<S>(G + o, D + o, X + o, M + n * C, PP + n * C, QQ + n * C,
                                  RR + n * C, SS + n * C, L, C, DX + o);
      }
    });
  }
}


// The mixed-precision instantiations (fp32 activations x, out, g, dz; bf16
// GEMM operands z, h, dO, du and weights, fp32 accumulation): what the
// pipeline runs under autocast, so the residual stream stays fp32 as in the
// reference under autocast. Named functions because RIFORMER_ISA_CALL's
// argument list cannot hold a template argument list's comma.
void mlp_forward_kernel_f32_bf16(const ForwardArgs& f, at::Tensor& out, bool emit_moments,
                                 at::Tensor& out_mean, at::Tensor& out_var, at::Tensor* u_out) {
  mlp_forward_kernel<c10::BFloat16, float>(f, out, emit_moments, out_mean, out_var, u_out);
}

void mlp_backward_kernel_f32_bf16(const ForwardArgs& f, const at::Tensor& g,
                                  const at::Tensor& mean_t, const at::Tensor* u_saved,
                                  at::Tensor& dz, at::Tensor& dw1, at::Tensor& db1,
                                  at::Tensor& dw2, at::Tensor& db2, at::Tensor& sums) {
  mlp_backward_kernel<c10::BFloat16, float>(f, g, mean_t, u_saved, dz, dw1, db1, dw2, db2, sums);
}
