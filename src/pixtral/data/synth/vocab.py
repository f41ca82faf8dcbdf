"""Closed vocabularies shared by the synthetic categories.

Every answer the generator writes comes from one of these small, fixed lists (or is a
small integer), so a tiny model can learn them and exact match is a fair metric.
"""

from __future__ import annotations

# Six colours that stay distinct after downscaling; solid fills on a white background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (20, 150, 40),
    "blue": (30, 70, 220),
    "yellow": (245, 200, 0),
    "black": (25, 25, 25),
    "orange": (255, 128, 0),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)

WHITE = (255, 255, 255)
INK = (0, 0, 0)
GREY = (150, 150, 150)
LIGHT_GREY = (215, 215, 215)
BROWN = (120, 72, 30)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
SHAPE_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}

# Single capital letters used as bar, column and node labels. I and J are left out:
# at 15 px they look like a line or a digit.
LETTERS: tuple[str, ...] = ("A", "B", "C", "D", "E", "F", "G", "H", "K", "M")

# Table row headers (short, so a 3-column table fits 184 px).
ITEMS: tuple[str, ...] = ("Milk", "Tea", "Rice", "Fish", "Cake", "Eggs", "Corn", "Jam", "Salt", "Soup")

# Document titles and the words that precede a number on a document page.
TITLES: tuple[str, ...] = (
    "Report", "Invoice", "Menu", "Notice", "Letter", "Receipt", "Memo", "Agenda", "Budget", "Ticket",
)
FIELDS: tuple[str, ...] = ("Total", "Price", "Room", "Page", "Size", "Level", "Day", "Age", "Floor", "Seat")

# Chart axis titles: drawn, never asked about.
CHART_TITLES: tuple[str, ...] = ("Sales", "Votes", "Score", "Visits", "Points", "Sold")

# Objects in misc scenes.
OBJECTS: tuple[str, ...] = ("ball", "car", "house", "tree")
OBJECT_PLURALS = {"ball": "balls", "car": "cars", "house": "houses", "tree": "trees"}

DIGITS: tuple[int, ...] = tuple(range(1, 10))  # values printed on charts, tables, documents
