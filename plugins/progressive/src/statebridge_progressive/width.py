"""placeholder"""
import statebridge as sb
class GrowWidth(sb.Transform):
    name = "grow_width"
    def plan(self, metas):
        return []
