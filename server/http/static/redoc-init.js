// Starts ReDoc in #redoc. Its settings come from this script tag's data attributes, so the page
// needs no inline script.
(function () {
  "use strict";
  var settings = document.currentScript.dataset;
  Redoc.init(settings.openapiUrl, {}, document.getElementById("redoc"));
})();
