"""The demo model's world: synthetic pictures of coloured shapes (``shapes``), an automatic judge of generated
pictures (``classify``), and the trained demo model's shipped weights (``weights``)."""
