// Small behaviours of the console's pages (no inline script: the CSP allows none).
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  // Every change is confirmed before it is sent.
  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  }
  // The query form's examples fill the spec box.
  const examples = document.getElementById("examples");
  const spec = document.getElementById("spec");
  if (examples && spec) {
    examples.addEventListener("change", () => { if (examples.value) spec.value = examples.value; });
  }
});
