"""The segmented sparse kernels of mixed-task serving (ops.segmented_spmm, ops.segmented_gather):
the reference against dense per-task matrices in float64, the torch backend and the Triton kernels
(the interpreter on CPU, the GPU under the cuda marker) against the reference."""

import pytest
import torch

from dpkernels import backends, ops
from dpkernels import reference as ref
from dpkernels.backends import torch_fused
from tests.conftest import TRITON_DEVICES, assert_close_by_rule, same_bits

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def layout(tasks: int, rows: int, cols: int, density: float, gen, device="cpu"):
    """Random per-task diffs of an (rows, cols) tensor: their dense (T, rows, cols) float64 matrices
    and the concatenated CSR the kernels take. Task 1 is empty, row 0 of task 0 is full (the
    longest entry range), and the values run from tiny to large."""
    mask = torch.rand(tasks, rows, cols, generator=gen) < density
    if tasks > 1:
        mask[1] = False
    mask[0, 0] = True
    values = torch.randn(tasks, rows, cols, generator=gen) * torch.exp2(torch.randint(-20, 3, (tasks, rows, cols),
                                                                                      generator=gen).float())
    dense = torch.where(mask, values, 0.0).double()
    rowptr, col, val, offset = [], [], [], 0
    for t in range(tasks):
        r, c = mask[t].nonzero(as_tuple=True)  # row-major: sorted by row, then column
        ptr = torch.zeros(rows + 1, dtype=torch.int64)
        ptr[1:] = torch.bincount(r, minlength=rows).cumsum(0)
        rowptr.append(ptr + offset)
        col.append(c.to(torch.int32))
        val.append(values[t][r, c])
        offset += r.numel()
    csr = (torch.stack(rowptr).to(device), torch.cat(col).to(device), torch.cat(val).to(device))
    return dense.to(device), csr


def spmm_case(m, k, n, tasks, density, dtype, device, gen, bias=True):
    dense, csr = layout(tasks, n, k, density, gen, device)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    y = torch.randn(m, n, generator=gen).to(device, dtype)
    row_task = torch.randint(0, tasks, (m,), generator=gen).to(device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    b = torch.randn(tasks, n, generator=gen).to(device, acc) if bias else None
    return dense, x, y, row_task, csr, b


def spmm_oracle(dense, x, y, row_task, b):
    """float64, from the dense matrices: y[m] + D_t x[m] + b[t] row by row."""
    out = y.double() + torch.einsum("mnk,mk->mn", dense[row_task], x.double())
    return out + (b[row_task].double() if b is not None else 0)


@pytest.mark.parametrize(("m", "k", "n", "tasks"), [(1, 1, 1, 1), (9, 9, 37, 3), (70, 33, 9, 4)])
def test_the_reference_is_each_rows_dense_task_product(m, k, n, tasks):
    gen = torch.Generator().manual_seed(m)
    dense, x, y, row_task, csr, b = spmm_case(m, k, n, tasks, 0.3, torch.float64, "cpu", gen)
    torch.testing.assert_close(ref.segmented_spmm(x, y, row_task, *csr, b), spmm_oracle(dense, x, y, row_task, b),
                               rtol=1e-13, atol=1e-13)
    ids = torch.randint(0, n, (m,), generator=gen)  # the (n, k) diff as an n-row embedding table
    table_y = torch.randn(m, k, generator=gen, dtype=torch.float64)
    assert torch.equal(ref.segmented_gather(ids, table_y, row_task, *csr), table_y + dense[row_task, ids])


def _check_spmm(impl, m, k, n, tasks, dtype, device, bias=True, strided=False):
    gen = torch.Generator().manual_seed(m * 7 + n)
    dense, x, y, row_task, csr, b = spmm_case(m, k, n, tasks, 0.3, dtype, device, gen, bias)
    if strided:  # a transposed x and every other column of y
        x = x.t().contiguous().t()
        y = torch.cat([y, y], 1)[:, ::2]
    oracle = spmm_oracle(dense, x, y, row_task, b)
    got = impl.segmented_spmm(x, y, row_task, *csr, b)
    assert got.dtype == dtype and got.shape == (m, n)
    if dtype == torch.float64:
        torch.testing.assert_close(got, oracle, rtol=1e-12, atol=1e-12)
    else:  # the reference in the same dtype sets the scale of the rounding
        same = ref.segmented_spmm(x, y, row_task, *csr, b)
        assert_close_by_rule(got, same, oracle, atol=torch.finfo(dtype).eps * oracle.abs().max().item() / 64,
                             name=f"{impl.__name__} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_backend_spmm_matches_the_dense_oracle(dtype):
    for shape in ((1, 1, 1, 1), (9, 9, 37, 3), (341, 33, 41, 5)):
        _check_spmm(torch_fused, *shape, dtype, "cpu")
    _check_spmm(torch_fused, 17, 5, 3, 2, dtype, "cpu", bias=False, strided=True)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_spmm_matches_the_dense_oracle_at_odd_shapes(device, dtype):
    from dpkernels.backends import triton as tri

    for shape in ((1, 1, 1, 1), (9, 9, 37, 3), (45, 33, 41, 5)):  # 45 x 41: partial tiles in both directions
        _check_spmm(tri, *shape, dtype, device)
    _check_spmm(tri, 17, 5, 3, 2, dtype, device, bias=False, strided=True)


def _check_gather(impl, m, rows, h, tasks, dtype, device):
    gen = torch.Generator().manual_seed(m + rows)
    dense, csr = layout(tasks, rows, h, 0.3, gen, device)
    ids = torch.randint(0, rows, (m,), generator=gen).to(device)
    ids[0] = 0  # the full row
    y = torch.randn(m, h, generator=gen).to(device, dtype)
    row_task = torch.randint(0, tasks, (m,), generator=gen).to(device)
    row_task[0] = 0
    expected = ref.segmented_gather(ids, y, row_task, *csr)
    # Exactly the lookup of the merged table: each entry round(acc(base) + delta), once.
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    merged = (y.to(acc) + dense[row_task, ids].to(acc)).to(dtype)
    assert same_bits(expected, merged)
    assert same_bits(impl.segmented_gather(ids, y, row_task, *csr), expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_backend_gather_is_the_merged_lookup_bit_for_bit(dtype):
    for shape in ((1, 1, 1, 1), (9, 23, 11, 3), (341, 41, 9, 5)):
        _check_gather(torch_fused, *shape, dtype, "cpu")


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_gather_is_the_merged_lookup_bit_for_bit(device, dtype):
    from dpkernels.backends import triton as tri

    for shape in ((1, 1, 1, 1), (9, 23, 11, 3), (131, 41, 9, 5)):  # 131 rows: two programs, the second partial
        _check_gather(tri, *shape, dtype, device)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_triton_segmented_kernels_on_the_gpu_at_a_real_shape(dtype):
    """BERT-base's FFN input layer (768 -> 3072) at 16 tasks, 2048 tokens, 0.5% density; an
    embedding table of 30522 x 768 likewise."""
    from dpkernels.backends import triton as tri

    gen = torch.Generator().manual_seed(0)
    dense, x, y, row_task, csr, b = spmm_case(2048, 768, 3072, 16, 0.005, dtype, "cuda", gen)
    row_task = row_task.sort().values  # samples' tokens consecutive, as in a batch
    oracle = spmm_oracle(dense, x, y, row_task, b)
    same = ref.segmented_spmm(x, y, row_task, *csr, b)
    got = tri.segmented_spmm(x, y, row_task, *csr, b)
    assert_close_by_rule(got, same, oracle, atol=torch.finfo(dtype).eps * oracle.abs().max().item() / 64)
    dense, csr = layout(16, 30522, 768, 0.005, gen, "cuda")
    ids = torch.randint(0, 30522, (2048,), generator=gen).cuda()
    y = torch.randn(2048, 768, generator=gen).cuda().to(dtype)
    assert same_bits(tri.segmented_gather(ids, y, row_task, *csr), ref.segmented_gather(ids, y, row_task, *csr))


def test_ops_dispatch_and_validate(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    _, x, y, row_task, csr, b = spmm_case(5, 4, 3, 2, 0.5, torch.float32, "cpu", gen)
    monkeypatch.setenv("DPKERNELS_BACKEND", "torch")
    torch.testing.assert_close(ops.segmented_spmm(x, y, row_task, *csr, b), ref.segmented_spmm(x, y, row_task, *csr, b))
    assert backends.info()["last_used"]["segmented_spmm"] == "torch"
    rowptr, col, val = csr
    with pytest.raises(TypeError, match="col must be a 1-D int32"):
        ops.segmented_spmm(x, y, row_task, rowptr, col.long(), val)
    with pytest.raises(TypeError, match="row_task must be a 1-D int64"):
        ops.segmented_spmm(x, y, row_task.int(), rowptr, col, val)
    with pytest.raises(ValueError, match="row_task has 4 entries for 5 rows"):
        ops.segmented_spmm(x, y, row_task[:4], rowptr, col, val)
    with pytest.raises(ValueError, match="rowptr has 3 rows per task, y 2 output features"):
        ops.segmented_spmm(x, y[:, :2], row_task, rowptr, col, val)
    with pytest.raises(ValueError, match="bias must be a row-contiguous"):
        ops.segmented_spmm(x, y, row_task, rowptr, col, val, b[:1])
    with pytest.raises(ValueError, match="must share rows"):
        ops.segmented_spmm(x[:4], y, row_task, rowptr, col, val)
    with pytest.raises(ValueError, match="ids must be the int64"):
        ops.segmented_gather(row_task.int(), y, row_task, rowptr, col, val)
