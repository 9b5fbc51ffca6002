"""Run-folder pictures: the masks-evolution picture names the concept behind each overlay colour."""

import numpy as np

from jaxconcept.runio import outputs, viz


def test_evolution_picture_has_a_key_naming_each_overlay_colour():
    image = np.full((16, 16, 3), 128, np.uint8)
    masks = np.zeros((2, 16, 16), bool)
    masks[0, :8], masks[1, 8:] = True, True
    tokens = ["<red_triangle>", "<purple_dotted_ring>"]
    cell, pad, label_h = 64, 4, 14
    pic = outputs.evolution_picture([image], [0, 0], [masks, masks], tokens, cell=cell)
    assert pic.shape == (pad + cell + label_h + pad, pad + 4 * (cell + pad), 3)  # image, 2 rounds, key
    x0, y0 = pad + 3 * (cell + pad), pad + label_h  # the key tile
    key = pic[y0:y0 + cell, x0:x0 + cell]
    overlay = outputs.color_overlay(image, masks)
    # swatch k sits at the top of entry k; at 64 px a line holds 8 characters, so "<red_triangle>" takes
    # lines0 = 3 lines ("<red_", then "triangle" and ">": cut after the underscore, then at the width) and the
    # entries start at y = 2 and 2 + 12 * lines0 + 2
    width = (cell - 16) // 6
    lines0 = len(viz.name_lines(tokens[0], width))
    assert lines0 == 3
    for k, top in enumerate((2, 2 + 12 * lines0 + 2)):
        np.testing.assert_array_equal(key[top + 5, 6], outputs.PALETTE[k])
        tinted = overlay[0, 0] if k == 0 else overlay[15, 0]
        assert np.abs(tinted.astype(int) - (0.5 * 128 + 0.5 * outputs.PALETTE[k])).max() <= 1  # the same colour
    text = (key[:, 14:] < 100).all(-1)  # dark text pixels right of the swatches
    rows_with_text = np.flatnonzero(text.any(1))
    assert rows_with_text.max() > 2 + 12 * lines0 + 12  # the long second name wrapped onto further lines


def test_long_token_names_wrap_after_an_underscore():
    assert viz.name_lines("<purple_dotted_ring>", 18) == ["<purple_dotted_", "ring>"]
    assert viz.name_lines("<ring>", 18) == ["<ring>"]
    assert viz.name_lines("x" * 40, 18) == ["x" * 18, "x" * 18, "x" * 4]  # no underscore: cut at the width
    assert viz.name_lines("", 18) == [""]


def test_key_tile_is_white_without_names():
    assert (viz.key_tile([], [], cell=32) == 255).all()


def test_a_mask_tint_keeps_its_hue_over_a_coloured_object():
    """The ring's tint (the second colour, green) over a purple ring reads green, not grey: the tint is blended
    over the image's luminance."""
    purple = np.zeros((4, 4, 3), np.uint8)
    purple[...] = (128, 40, 160)
    mask = np.zeros((2, 4, 4), bool)
    mask[1] = True
    r, g, b = outputs.color_overlay(purple, mask)[0, 0].astype(int)
    assert g > r + 40 and g > b + 40, (r, g, b)
    assert (outputs.color_overlay(purple, np.zeros((2, 4, 4), bool)) == outputs.color_overlay(purple, mask[:0])).all()


def test_line_plot_joins_numbered_points_and_leaves_named_categories_apart():
    series = {"a": [0.2, 0.8]}
    size = (200, 120)  # frame x 44..188, y 32..84 (0..1 upward)
    joined = viz.line_plot(series, size=size)
    apart = viz.line_plot(series, size=size, x_ticks=["em", "words"], errors={"a": [0.1, 0.1]})
    blue = lambda pic, x, y: tuple(pic[y, x]) == (31, 119, 180)  # noqa: E731  the first series' colour
    # halfway between the two points: on the line when joined, white when the x values are categories
    assert blue(joined, 116, 58) and tuple(apart[58, 116]) == (255, 255, 255)
    # categories sit half a step in from the frame (x = 44 + 144 / 4 = 80 for the first), with a capped bar
    assert blue(apart, 80, int(84 - 0.2 * 52)) and not blue(apart, 45, int(84 - 0.2 * 52))
    assert blue(apart, 80 - 2 - 2, int(round(84 - 0.3 * 52)))
