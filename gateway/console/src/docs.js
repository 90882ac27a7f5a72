// Starts Swagger UI on the gateway's own document (/openapi.json): no CDN, no inline script.
/* global SwaggerUIBundle */
window.addEventListener("DOMContentLoaded", () => {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    // Deep links put an <a> inside each operation's toggle button (axe: nested-interactive).
    deepLinking: false,
    // The console's signed-in token, when there is one, saves pasting it twice.
    onComplete: () => {
      const token = sessionStorage.getItem("autoecoops.console.token");
      if (token) window.ui.preauthorizeApiKey("bearer", token);
    },
    validatorUrl: null,
    tryItOutEnabled: false,
  });
});
