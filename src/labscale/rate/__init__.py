"""Human evaluation in the browser (`labscale rate`) and an optional LLM judge on the same items.

items.py builds what can be rated from one experiment's stored outputs; sessions.py gives each rater a seeded,
blinded order with opaque item codes and ~10% repeats; app.py is the FastAPI app (page.py its page); server.py
binds and runs it; judge.py rates the same items with a model of the experiment; stats.py holds the statistics
the report shows (report/human.py).
"""
