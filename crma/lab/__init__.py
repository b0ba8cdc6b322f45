"""What the CRMA Lab Space needs besides its widgets, testable without a browser and without gradio: the form
(`form`), run folders and the stop flag (`runs`), the live view (`live`), defaults and estimates (`estimates`), and the
text the page hands out (`snippets`). `app.py` is only layout and handlers over these."""
