"""What the CRMA Lab Space needs besides its widgets, testable without a browser and without gradio: the form and
the Space's caps (`form`), the memory preflight (`memory`), private run folders and the stop flag (`runs`), where a
run trains and who completes its folder (`launcher`), the live view that follows a run folder (`live`), defaults and
time estimates (`estimates`), the committed study (`published`), the text the page hands out (`snippets`), and the
page's static pieces (`page_assets`). `crma.ui` is only layout and handlers over these."""
