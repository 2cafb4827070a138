"""Step-time benchmark on throttled links (issue 4): see ``run.py``; ``netns.py`` builds the
network namespaces and ``tc`` limits, ``rank.py`` is one rank of a run, ``report.py`` turns a
run's JSON into the tables, the markdown and the plot."""
