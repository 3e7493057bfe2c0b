"""A catalogue's own quality check (configs/jobs/catalog.yaml: quality.classifier).

fn(pixels, request) -> None or True to accept, False or a reason to reject. `pixels` is the
image as made ([H, W, 3] uint8), `request` its ImageRequest (prompt, seed, metadata...).
"""


def verdict(pixels, request):
    """Product shots must be lit: reject a dark image (mean brightness under 40 of 255)."""
    brightness = float(pixels.mean())
    if brightness < 40:
        return f"too dark for the catalogue (mean brightness {brightness:.0f} < 40)"
    return None
