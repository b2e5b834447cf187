// backupmx dashboard: a little help, never required. Confirms destructive forms and refreshes pages
// that ask for it (data-refresh on <body>) while the page is visible and nobody is typing.
(function () {
  "use strict";
  document.addEventListener("submit", function (ev) {
    var form = ev.target;
    var text = form.getAttribute && form.getAttribute("data-confirm");
    if (text && !window.confirm(text)) { ev.preventDefault(); }
  });
  var every = parseInt(document.body.getAttribute("data-refresh") || "0", 10);
  if (every > 0) {
    window.setInterval(function () {
      var el = document.activeElement;
      var typing = el && (el.tagName === "INPUT" || el.tagName === "SELECT" || el.tagName === "TEXTAREA");
      if (!document.hidden && !typing) { window.location.reload(); }
    }, every * 1000);
  }
})();
