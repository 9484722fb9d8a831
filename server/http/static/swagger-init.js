// Starts Swagger UI in #swagger-ui. Its settings come from this script tag's data attributes, so
// the page needs no inline script (its Content-Security-Policy allows served files only).
(function () {
  "use strict";
  var settings = document.currentScript.dataset;
  window.ui = SwaggerUIBundle({
    url: settings.openapiUrl,
    dom_id: "#swagger-ui",
    layout: "BaseLayout",
    deepLinking: true,
    showExtensions: true,
    showCommonExtensions: true,
    // The default validator is a third-party service (validator.swagger.io): never called.
    validatorUrl: null,
    // A key typed into "Authorize" stays in this page's memory, not in localStorage.
    persistAuthorization: false,
    presets: [SwaggerUIBundle.presets.apis],
  });
})();
