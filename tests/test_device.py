"""Explanations follow the inputs' device: CUDA maps equal CPU maps (skipped without a GPU)."""
import pytest
import torch

from baselines.ViT import ViT_LRP as V
from baselines.ViT.ViT_explanation_generator import explain, normalize
from modules.methods import METHOD_NAMES

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@cuda
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_cuda_maps_equal_cpu_maps(method):
    # float64: the comparison is about following the device, not about how
    # much LRP's separate denominators amplify float32 rounding differences
    torch.manual_seed(0)
    model = V.VisionTransformer(img_size=64, patch_size=16, num_classes=10, embed_dim=96, depth=3,
                                num_heads=3).double().eval()
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    cpu = normalize(explain(model, x, method, index=torch.tensor([1, 2, 3, 4])))
    gpu = explain(model.to("cuda"), x.to("cuda"), method, index=torch.tensor([1, 2, 3, 4]))
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(normalize(gpu).cpu(), cpu, atol=1e-6, rtol=0)
