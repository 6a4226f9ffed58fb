"""The parts of a chaos run (``scripts/chaos.py`` puts them together).

* :mod:`.journal`: what happened when: the run's clock and event ticks,
  counts, the violations found, and the summary at the end.
* :mod:`.clients`: the users, one selectors loop over their connections,
  and the chat load they make.
* :mod:`.oracle`: what the users were promised, checked line by line as
  they come and once more at the end.
* :mod:`.faults`: the kills, the restarts, and which process came back.
"""
