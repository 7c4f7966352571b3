"""Register-tiled matrix-product microkernels for the CPU kernels (Numba intrinsics that
emit LLVM vector code).

Numba has no vector types, so a loop written in Numba keeps its running sums in memory:
the recurrent products of the LSTM kernels used to load and store their output rows
for every four terms (``z += h U`` in rows of U), or to reduce sixteen vector sums to
scalars for every output tile (dot products with rows of U^T).  Here ``tile_RxC``
emits the classic GEMM microkernel directly in LLVM IR::

    C[r0:r0+R, j0:j0+C*V] += A[r0:r0+R, :K] @ B[:K, j0:j0+C*V]

with the R x C accumulators held in vector registers across the whole k loop: per k,
C vector loads of a row of B, R broadcasts of A[r, k], R * C fused multiply-adds, and
no stores until the loop ends.  V is the number of floats in one vector register
(16 float32 with AVX-512, 8 with AVX2).  LLVM picks the instructions for the host CPU,
so the code is portable; only the speed depends on the register width.

Measured on one Zen 4 core (scratch A/B in one process, z[16, 1024] += h[16, 256]
U[256, 1024], the C2 per-thread recurrent product): 106 GFLOP/s with 4 x 4 tiles,
against 73 GFLOP/s for the loops they replace and 46 for NumPy's matmul at that size.

``dot_rows_acc`` is the other product shape: each output a dot product of two
contiguous rows, four rows by four outputs at a time, for an operand stored by rows of
the output's columns.

The tiles' arrays must be C-contiguous (the typing refuses any other layout): rows are
read with the row stride and elements with unit stride.  The tiles do not check
bounds; the drivers below only call them inside the arrays.
"""
import llvmlite.binding as llvm
import numba
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..config import NJIT_INLINE_OPTS


def _vector_bytes():
    """Bytes of one vector register of the CPU Numba compiles for: 64 with AVX-512,
    else 32.  With NUMBA_CPU_NAME set (a portable cache, e.g. "generic"), the features
    Numba is told to use (NUMBA_CPU_FEATURES) decide, and 16 without AVX."""
    try:
        if numba.config.CPU_NAME and numba.config.CPU_NAME != "host":
            feats = (numba.config.CPU_FEATURES or "").split(",")
            if "+avx512f" in feats:
                return 64
            return 32 if "+avx" in feats or "+avx2" in feats else 16
        feats = llvm.get_host_cpu_features()
        return 64 if feats.get("avx512f", False) else 32
    except Exception:  # pragma: no cover - the features query is best effort
        return 32


VECTOR_BYTES = _vector_bytes()


def _make_tile(NR, NC):
    """The intrinsic ``tile(A, ar, ak, B, bj, C, cr, cj, K)`` for an NR-row by NC-vector
    tile: C[cr:cr+NR, cj:cj+NC*V] += A[ar:ar+NR, ak:ak+K] @ B[:K, bj:bj+NC*V].

    A: [M, >=ak+K];  B: [>=K, N];  C: [M', N']  (2-D, C-contiguous, one float dtype)
    ar, ak, bj, cr, cj, K: integers (intp); nothing is bounds-checked
    """

    @intrinsic
    def tile(typingctx, A, ar, ak, B, bj, C, cr, cj, K):
        arrays = (A, B, C)
        if not all(isinstance(a, types.Array) and a.ndim == 2 and a.layout == "C"
                   for a in arrays):
            raise TypeError("tile_cpu: A, B and C must be 2-D C-contiguous arrays")
        if not (A.dtype == B.dtype == C.dtype and A.dtype in (types.float32,
                                                               types.float64)):
            raise TypeError("tile_cpu: A, B and C must all be float32 or all float64")
        sig = types.void(A, types.intp, types.intp, B, types.intp, C, types.intp,
                         types.intp, types.intp)

        def codegen(context, builder, signature, args):
            a_v, ar_v, ak_v, b_v, bj_v, c_v, cr_v, cj_v, k_v = args
            fty = context.get_value_type(signature.args[0].dtype)
            isz = context.get_abi_sizeof(fty)
            V = VECTOR_BYTES // isz
            vty = ir.VectorType(fty, V)
            vptr = vty.as_pointer()
            i64 = context.get_value_type(types.intp)
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vty, [vty, vty, vty]),
                "llvm.fma.v%df%d" % (V, 8 * isz))
            a = context.make_array(signature.args[0])(context, builder, a_v)
            b = context.make_array(signature.args[3])(context, builder, b_v)
            c = context.make_array(signature.args[5])(context, builder, c_v)
            shift = ir.Constant(i64, isz.bit_length() - 1)   # bytes -> elements

            def row_stride(arr):
                return builder.ashr(cgutils.unpack_tuple(builder, arr.strides)[0], shift)

            def const(x):
                return ir.Constant(i64, x)

            lda, ldb, ldc = row_stride(a), row_stride(b), row_stride(c)
            pa = [builder.gep(a.data, [builder.add(
                builder.mul(builder.add(ar_v, const(r)), lda), ak_v)]) for r in range(NR)]
            pb = builder.gep(b.data, [bj_v])
            pc = [builder.gep(c.data, [builder.add(
                builder.mul(builder.add(cr_v, const(r)), ldc), cj_v)]) for r in range(NR)]

            def vptr_at(p, off):
                return builder.bitcast(builder.gep(p, [const(off)]), vptr)

            acc0 = [[builder.load(vptr_at(pc[r], q * V), align=isz) for q in range(NC)]
                    for r in range(NR)]
            entry = builder.basic_block
            loop = builder.append_basic_block("tile.loop")
            done = builder.append_basic_block("tile.done")
            builder.cbranch(builder.icmp_signed(">", k_v, const(0)), loop, done)

            builder.position_at_end(loop)
            k = builder.phi(i64)
            k.add_incoming(const(0), entry)
            acc = [[builder.phi(vty) for _ in range(NC)] for _ in range(NR)]
            for r in range(NR):
                for q in range(NC):
                    acc[r][q].add_incoming(acc0[r][q], entry)
            brow = builder.gep(pb, [builder.mul(k, ldb)])
            bv = [builder.load(vptr_at(brow, q * V), align=isz) for q in range(NC)]
            splat = ir.Constant(ir.VectorType(ir.IntType(32), V), [0] * V)
            undef = ir.Constant(vty, ir.Undefined)
            new = []
            for r in range(NR):
                s = builder.load(builder.gep(pa[r], [k]))
                sv = builder.insert_element(undef, s, ir.Constant(ir.IntType(32), 0))
                sv = builder.shuffle_vector(sv, undef, splat)
                new.append([builder.call(fma, [sv, bv[q], acc[r][q]]) for q in range(NC)])
            k1 = builder.add(k, const(1))
            k.add_incoming(k1, loop)
            for r in range(NR):
                for q in range(NC):
                    acc[r][q].add_incoming(new[r][q], loop)
            builder.cbranch(builder.icmp_signed("<", k1, k_v), loop, done)

            builder.position_at_end(done)
            final = []
            for r in range(NR):          # every phi first, then the stores
                for q in range(NC):
                    ph = builder.phi(vty)
                    ph.add_incoming(acc0[r][q], entry)
                    ph.add_incoming(new[r][q], loop)
                    final.append((ph, r, q))
            for ph, r, q in final:
                builder.store(ph, vptr_at(pc[r], q * V), align=isz)
            return context.get_dummy_value()

        return sig, codegen

    return tile


tile_4x4 = _make_tile(4, 4)
tile_4x2 = _make_tile(4, 2)
tile_4x1 = _make_tile(4, 1)
tile_1x16 = _make_tile(1, 16)
tile_1x8 = _make_tile(1, 8)
tile_1x4 = _make_tile(1, 4)
tile_1x1 = _make_tile(1, 1)

# The widest single-row tile, in vectors: 16 accumulators fit AVX-512's 32 vector
# registers, 8 fit the 16 of AVX2 and SSE.  A row tile has no other rows to reuse its
# loads of B across, so its k loop is a stream through a contiguous panel of B and its
# speed is set by how many independent FMA chains it keeps in flight: on one Zen 4 core
# (scratch A/B, h [1, 128] U [128, 256], U in L2) 1 x 4 tiles took 1.89 us, 1 x 8
# 1.43 us and 1 x 16 1.18 us, against 1.56 us for the k-by-4 row loops.
ROW_TILE_VECTORS = 16 if VECTOR_BYTES == 64 else 8


@njit(**NJIT_INLINE_OPTS)
def vector_width(A):
    """Elements of A's dtype in one vector register (V in the module docstring)."""
    return VECTOR_BYTES // A.itemsize


@njit(**NJIT_INLINE_OPTS)
def tile_rows4(A, r, ak, K, B, C, j_lo, j_hi, c_off):
    """C[r:r+4, c_off+j_lo:c_off+j_hi] += A[r:r+4, ak:ak+K] @ B[:K, j_lo:j_hi] with tiles
    (j_hi - j_lo a multiple of the vector width V): 4 x 4 tiles, then 4 x 2 and 4 x 1
    (a 4 x 2 tile broadcasts each A element once for two vectors of B).

    A: [M, >=ak+K];  B: [>=K, N];  C: [M, >=c_off+N]  (all C-contiguous, same float
    dtype)
    """
    V = vector_width(A)
    j = j_lo
    while j + 4 * V <= j_hi:
        tile_4x4(A, r, ak, B, j, C, r, c_off + j, K)
        j += 4 * V
    while j + 2 * V <= j_hi:
        tile_4x2(A, r, ak, B, j, C, r, c_off + j, K)
        j += 2 * V
    while j < j_hi:
        tile_4x1(A, r, ak, B, j, C, r, c_off + j, K)
        j += V


@njit(**NJIT_INLINE_OPTS)
def tile_row1(A, r, ak, K, B, C, j_lo, j_hi, c_off):
    """As tile_rows4 for the single row r: the widest row tiles first (1 x 16 vectors
    with AVX-512, see ROW_TILE_VECTORS), then 1 x 8, 1 x 4 and 1 x 1."""
    V = vector_width(A)
    j = j_lo
    if ROW_TILE_VECTORS == 16:
        while j + 16 * V <= j_hi:
            tile_1x16(A, r, ak, B, j, C, r, c_off + j, K)
            j += 16 * V
    while j + 8 * V <= j_hi:
        tile_1x8(A, r, ak, B, j, C, r, c_off + j, K)
        j += 8 * V
    while j + 4 * V <= j_hi:
        tile_1x4(A, r, ak, B, j, C, r, c_off + j, K)
        j += 4 * V
    while j < j_hi:
        tile_1x1(A, r, ak, B, j, C, r, c_off + j, K)
        j += V


@njit(**NJIT_INLINE_OPTS)
def scalar_cols(A, r, ak, K, B, C, j_lo, j_hi, c_off):
    """C[r, c_off+j_lo:c_off+j_hi] += A[r, ak:ak+K] @ B[:K, j_lo:j_hi] in plain loops
    (the columns past the last whole vector)."""
    for j in range(j_lo, j_hi):
        s = C[r, c_off + j]
        for k in range(K):
            s += A[r, ak + k] * B[k, j]
        C[r, c_off + j] = s


@njit(**NJIT_INLINE_OPTS)
def gemm_rows_acc(A, n, B, C):
    """C[:n] += A[:n] @ B.

    A: [M, K];  B: [K, N];  C: [M, N]  (C-contiguous, same float dtype; n <= M)
    Column blocks of 4 V outer, row groups of 4 inner: a block of B (K x 4V) is read
    from cache by every row group in turn; then each leftover row across all columns
    at once (the wide row tiles).  Every element is C's value plus its K products
    added in k order, so the result does not depend on the tiling.
    """
    gemm_rows_acc_k(A, n, 0, A.shape[1], B, C)


@njit(**NJIT_INLINE_OPTS)
def gemm_rows_acc_k(A, n, ak, K, B, C):
    """C[:n] += A[:n, ak:ak+K] @ B[:K], as gemm_rows_acc (B's row 0 multiplies A's
    column ak).

    A: [M, >=ak+K];  B: [>=K, N];  C: [M, N]  (C-contiguous, same float dtype)
    """
    N = B.shape[1]
    NV = gemm_rows_acc_vec(A, n, ak, K, B, C)
    if NV < N:
        for r in range(n):
            scalar_cols(A, r, ak, K, B, C, NV, N, 0)


@njit(**NJIT_INLINE_OPTS)
def gemm_rows_acc_vec(A, n, ak, K, B, C):
    """gemm_rows_acc_k on the columns of B that fill whole vectors only: columns below
    NV = N - N % V, the value returned (the caller does the rest its own way).

    A: [M, >=ak+K];  B: [>=K, N];  C: [M, >=N]  (C-contiguous, same float dtype)
    """
    N = B.shape[1]
    V = vector_width(A)
    NV = N - N % V
    R4 = n - n % 4
    W = 4 * V
    for j0 in range(0, NV, W):
        j1 = min(j0 + W, NV)
        for r in range(0, R4, 4):
            tile_rows4(A, r, ak, K, B, C, j0, j1, 0)
    for r in range(R4, n):
        tile_row1(A, r, ak, K, B, C, 0, NV, 0)
    return NV


@njit(inline="always", **NJIT_INLINE_OPTS)
def _dot4x4(a0, a1, a2, a3, m0, m1, m2, m3, K):
    """The sixteen dot products a_r . m_i over [0, K) (rows of equal length)."""
    s00 = s01 = s02 = s03 = a0.dtype.type(0)
    s10 = s11 = s12 = s13 = s00
    s20 = s21 = s22 = s23 = s00
    s30 = s31 = s32 = s33 = s00
    for k in range(K):
        x0 = a0[k]
        x1 = a1[k]
        x2 = a2[k]
        x3 = a3[k]
        p = m0[k]
        q = m1[k]
        v = m2[k]
        w = m3[k]
        s00 += x0 * p
        s01 += x0 * q
        s02 += x0 * v
        s03 += x0 * w
        s10 += x1 * p
        s11 += x1 * q
        s12 += x1 * v
        s13 += x1 * w
        s20 += x2 * p
        s21 += x2 * q
        s22 += x2 * v
        s23 += x2 * w
        s30 += x3 * p
        s31 += x3 * q
        s32 += x3 * v
        s33 += x3 * w
    return (s00, s01, s02, s03, s10, s11, s12, s13,
            s20, s21, s22, s23, s30, s31, s32, s33)


@njit(inline="always", **NJIT_INLINE_OPTS)
def _dot1(x, m, K):
    """x . m over [0, K) (the leftovers of the 4 x 4 tile)."""
    acc = x.dtype.type(0)
    for k in range(K):
        acc += x[k] * m[k]
    return acc


@njit(inline="always", **NJIT_INLINE_OPTS)
def dot_rows_acc(a, n, M, out):
    """out[r, i] += a[r] . M[i] for rows r < n and every row i of M (a [B, K],
    M [N, K], out [B, N], any layout; a U is dot_rows_acc with M = U^T): four rows by
    four outputs at a time (sixteen sums in registers), leftovers one by one.  For
    products whose other operand is stored by rows of the output's columns (the
    backward kernel's dz U^T, the table kernel's last Dense columns)."""
    N, K = M.shape
    R4 = n - n % 4
    N4 = N - N % 4
    for r in range(0, R4, 4):
        a0 = a[r]
        a1 = a[r + 1]
        a2 = a[r + 2]
        a3 = a[r + 3]
        o0 = out[r]
        o1 = out[r + 1]
        o2 = out[r + 2]
        o3 = out[r + 3]
        for i in range(0, N4, 4):
            (s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23,
             s30, s31, s32, s33) = _dot4x4(a0, a1, a2, a3, M[i], M[i + 1], M[i + 2],
                                           M[i + 3], K)
            o0[i] += s00
            o0[i + 1] += s01
            o0[i + 2] += s02
            o0[i + 3] += s03
            o1[i] += s10
            o1[i + 1] += s11
            o1[i + 2] += s12
            o1[i + 3] += s13
            o2[i] += s20
            o2[i + 1] += s21
            o2[i + 2] += s22
            o2[i + 3] += s23
            o3[i] += s30
            o3[i + 1] += s31
            o3[i + 2] += s32
            o3[i + 3] += s33
        for i in range(N4, N):
            for q in range(4):
                out[r + q, i] += _dot1(a[r + q], M[i], K)
    for r in range(R4, n):
        for i in range(N):
            out[r, i] += _dot1(a[r], M[i], K)
